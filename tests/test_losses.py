"""Each loss term against a small case computed by hand (or by an independent numpy formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from erc_distill.data.datamodule import Batch
from erc_distill.distill.losses import (
    DIST, LOSSES, CrossEntropy, FeatureKD, HiddenMSE, HintonKD, SPCLPrototype, SupCon, inverse_frequency_weights,
)
from erc_distill.distill.objective import LossConfig, build_objective, parse_loss_spec
from erc_distill.modeling import ModelOutput


def batch(labels, teacher=None, mask_index=None) -> Batch:
    n = len(labels)
    return Batch(torch.zeros(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long),
                 torch.tensor(mask_index or [0] * n), torch.tensor(labels), [str(i) for i in range(n)], teacher)


def out(logits=None, features=None, hidden=None) -> ModelOutput:
    logits = torch.as_tensor(logits if logits is not None else [[0.0]], dtype=torch.float)
    features = torch.as_tensor(features if features is not None else [[0.0]], dtype=torch.float)
    return ModelOutput(logits, features, hidden)


def test_cross_entropy_plain_weighted_focal_and_unlabelled():
    z = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]
    b = batch([0, 1, -1])  # the third turn is unlabelled: ignored
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.e / (math.e + 2)
    nll0, nll1 = -math.log(p0), -math.log(p1)
    assert CrossEntropy()(out(z), b).item() == pytest.approx((nll0 + nll1) / 2, rel=1e-5)
    weighted = CrossEntropy(torch.tensor([1.0, 3.0, 1.0]))(out(z), b)
    assert weighted.item() == pytest.approx((nll0 + 3 * nll1) / 4, rel=1e-5)
    focal = CrossEntropy(gamma=2.0)(out(z), b)
    assert focal.item() == pytest.approx(((1 - p0) ** 2 * nll0 + (1 - p1) ** 2 * nll1) / 2, rel=1e-5)


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(torch.tensor([300, 100]), power=1.0)  # (N / (C n_c)) = 2/3, 2 -> mean 1
    assert w.tolist() == pytest.approx([0.5, 1.5])


def test_hinton_kd():
    teacher = {"logits": torch.tensor([[math.log(3.0), 0.0]])}
    s = out([[0.0, 0.0]])
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert HintonKD(tau=1.0)(s, batch([0], teacher)).item() == pytest.approx(kl1, rel=1e-5)
    q = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln 3 / 2, 0])
    kl2 = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    assert HintonKD(tau=2.0)(s, batch([0], teacher)).item() == pytest.approx(4 * kl2, rel=1e-5)


def test_dist_matches_numpy_pearson():
    pt = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.3, 0.3, 0.4]])
    ps = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    teacher = {"logits": torch.tensor(np.log(pt), dtype=torch.float)}
    loss = DIST(tau=1.0)(out(np.log(ps)), batch([0, 1, 2], teacher)).item()
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(3)])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(3)])
    assert loss == pytest.approx(inter + intra, rel=1e-4)
    same = DIST(tau=4.0)(out(np.log(pt)), batch([0, 1, 2], teacher)).item()
    assert same == pytest.approx(0.0, abs=1e-5)


def test_feature_kd_matches_numpy():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    term = FeatureKD(5, 5, tau=0.5)
    loss = term(out([[0.0]] * 4, s), batch([0] * 4, {"features": torch.tensor(t, dtype=torch.float)})).item()
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(tn @ tn.T / 0.5), softmax(tn @ sn.T / 0.5)
    assert loss == pytest.approx(np.mean(np.sum(p * np.log(p / q), 1)), rel=1e-4)
    zero = term(out([[0.0]] * 4, t), batch([0] * 4, {"features": torch.tensor(t, dtype=torch.float)})).item()
    assert zero == pytest.approx(0.0, abs=1e-5)


def test_feature_kd_projects_when_widths_differ():
    term = FeatureKD(3, 5)
    assert isinstance(term.proj, torch.nn.Linear) and term.proj.weight.shape == (5, 3)
    loss = term(out([[0.0]] * 2, torch.randn(2, 3)), batch([0, 1], {"features": torch.randn(2, 5)}))
    loss.backward()
    assert term.proj.weight.grad is not None


def test_hidden_mse_at_the_mask_position():
    h = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)  # [B, T, H]
    hidden = (h * 0, h, h * 2)  # embeddings, layer 1, layer 2
    b = batch([0, 1], mask_index=[2, 1])
    at_mask = torch.stack([h[0, 2], h[1, 1]])
    teacher = torch.stack([at_mask, 2 * at_mask + 1], dim=1)  # [B, 2 layers, H]
    b.teacher = {"hidden": teacher}
    loss = HiddenMSE(4, 4, [1, 2])(out(hidden=hidden), b)
    assert loss.item() == pytest.approx((0.0 + 1.0) / 2)


def test_supcon_hand_case():
    z = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    loss = SupCon(tau=1.0)(out([[0.0]] * 3, z), batch([0, 0, 1]))
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-5)  # anchor 2 has no positive


def test_spcl_prototypes_from_queues():
    term = SPCLPrototype(num_classes=2, dim=2, queue_size=4, k=1, tau=1.0)
    z = [[1.0, 0.0], [0.0, 1.0]]
    first = term(out([[0.0]] * 2, z), batch([0, 1]))
    assert first.item() == 0.0  # empty queues, no same-label pair: nothing to contrast yet
    assert term.filled.tolist() == [1, 1]
    second = term(out([[0.0]] * 2, z), batch([0, 1]))
    # anchor 0: keys z1 (0), p0 (1), p1 (0); positive p0
    assert second.item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-5)
    term.eval()
    term(out([[0.0]] * 2, z), batch([0, 1]))
    assert term.filled.tolist() == [2, 2]  # eval mode: nothing enqueued
    assert term.ptr.tolist() == [2, 2]


def test_parse_loss_spec_and_formula():
    assert parse_loss_spec("ce=1, dist=1,feature=0.5") == {"ce": 1.0, "dist": 1.0, "feature": 0.5}
    assert parse_loss_spec("ce") == {"ce": 1.0}
    from erc_distill.config import Setting, build_config
    from erc_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown loss 'kl'"):  # names are checked against the registry
        build_config([Setting("loss", "ce=1,kl=1", "command line", "--loss")])
    with pytest.raises(ValueError, match="must be a number"):
        parse_loss_spec("ce=x")
    obj = build_objective(LossConfig(weights={"ce": 1.0, "dist": 2.0, "feature": 0.5}), 3, 4, 6)
    assert str(obj) == "L = 1·ce + 2·dist(τ=4) + 0.5·feature(τ=1)"
    assert obj.needs_teacher and not obj.needs_hidden


def test_objective_is_the_weighted_sum_of_logged_terms():
    obj = build_objective(LossConfig(weights={"ce": 1.0, "kd": 0.5}, tau=2.0), 3, 4, 4)
    teacher = {"logits": torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), "features": torch.zeros(2, 4)}
    result = obj(out([[0.5, 0.1, 0.0], [0.0, 0.3, 0.9]], torch.zeros(2, 4)), batch([0, 2], teacher))
    assert set(result.terms) == {"ce", "kd"}
    assert result.total.item() == pytest.approx(result.terms["ce"].item() + 0.5 * result.terms["kd"].item())


def test_teacher_terms_without_a_teacher_fail_clearly():
    with pytest.raises(ValueError, match="need the teacher's features"):
        build_objective(LossConfig(weights={"dist": 1.0, "feature": 0.5}), 3, 4)
    build_objective(LossConfig(weights={"dist": 1.0}), 3, 4)  # logit terms: teacher output files have no features
    with pytest.raises(ValueError, match="needs teacher logits"):
        DIST()(out([[0.0, 1.0]]), batch([0]))


def test_every_registered_term_is_buildable():
    for name in LOSSES:
        obj = build_objective(LossConfig(weights={name: 1.0}), 3, 4, 4, torch.tensor([5, 3, 2]), 2)
        assert name in obj.terms


def test_spcl_curriculum_starts_with_the_easy_half():
    term = SPCLPrototype(num_classes=2, dim=2, queue_size=8, k=8, tau=1.0, curriculum=True)
    term.enqueue(torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4), torch.tensor([0] * 4 + [1] * 4))
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.9], [0.0, 1.0], [0.9, 1.0]]), dim=-1)
    y = torch.tensor([0, 0, 1, 1])
    protos, proto_y = term.prototypes()
    term.progress = 0.0
    assert term._curriculum_anchors(z, y, protos, proto_y).tolist() == [True, False, True, False]
    term.progress = 1.0
    assert term._curriculum_anchors(z, y, protos, proto_y).all()
    assert "curriculum" in term.describe()


def test_loss_key_holds_only_the_terms_in_use():
    ce = LossConfig(weights={"ce": 1.0})
    assert ce.key() == LossConfig(weights={"ce": 1.0}, tau=2.0, spcl_curriculum=True).key()
    assert ce.key() != LossConfig(weights={"ce": 1.0}, class_weight_power=0.5).key()
    kd = LossConfig(weights={"ce": 1.0, "dist": 1.0})
    assert kd.key() != LossConfig(weights={"ce": 1.0, "dist": 1.0}, tau=2.0).key()
