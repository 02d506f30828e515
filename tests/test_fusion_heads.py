"""Fusion heads (erc_distill.fusion): batch invariance, missing modalities, gradients, ONNX, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from erc_distill.fusion import FUSION_HEADS, FusionHead, FusionOutput, build_fusion_head, export_onnx

DT, DA, DV, C = 32, 24, 20, 7
HEADS = sorted(FUSION_HEADS)
OPTIONS = {"mult": {"dim": 32}}  # small width: fast tests
# (audio present, visual present) for each case
CASES = {"audio_missing": (False, True), "visual_missing": (True, False), "both_missing": (False, False)}


def make(name: str, seed: int = 0) -> FusionHead:
    torch.manual_seed(seed)
    return build_fusion_head(name, DT, DA, DV, C, **OPTIONS.get(name, {}))


def inputs(batch: int, audio: list[bool] | bool = True, visual: list[bool] | bool = True, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    a_mask = torch.tensor(audio if isinstance(audio, list) else [audio] * batch, dtype=torch.float32)
    v_mask = torch.tensor(visual if isinstance(visual, list) else [visual] * batch, dtype=torch.float32)
    return (
        torch.randn(batch, DT, generator=gen) * 3,
        torch.randn(batch, DA, generator=gen),
        torch.randn(batch, DV, generator=gen),
        a_mask,
        v_mask,
    )


def run(head: FusionHead, args, seed: int = 123) -> FusionOutput:
    torch.manual_seed(seed)  # same dropout masks in training mode
    return head(*args)


def test_registry() -> None:
    assert set(HEADS) == {"asf", "mag", "mult"}
    for name in HEADS:
        head = make(name)
        assert isinstance(head, FusionHead) and head.name == name
        assert isinstance(head.classifier, torch.nn.Linear) and head.classifier.out_features == C
    with pytest.raises(ValueError, match="unknown fusion head 'nope'.*asf, mag, mult"):
        build_fusion_head("nope", DT, DA, DV, C)
    with pytest.raises(ValueError, match="bad option"):
        build_fusion_head("mag", DT, DA, DV, C, no_such_option=1)
    with pytest.raises(ValueError, match="num_heads"):
        build_fusion_head("asf", 30, DA, DV, C, num_heads=4)


@pytest.mark.parametrize("name", HEADS)
def test_batch_invariance(name: str) -> None:
    head = make(name).eval()
    masks_a = [True, False, True, False, True, True, False, False]
    masks_v = [True, True, False, False, False, True, True, False]
    batch = inputs(8, masks_a, masks_v)
    with torch.no_grad():
        full = head(*batch)
        for i in range(8):
            one = head(*(x[i : i + 1] for x in batch))
            assert (one.logits[0] - full.logits[i]).abs().max().item() <= 1e-5, f"sample {i}"
            assert (one.features[0] - full.features[i]).abs().max().item() <= 1e-5, f"sample {i}"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", HEADS)
def test_missing_modality(name: str, case: str, training: bool) -> None:
    head = make(name).train(training)
    has_a, has_v = CASES[case]
    args = inputs(4, has_a, has_v)
    out = run(head, args)
    assert out.logits.shape == (4, C) and out.features.shape == (4, head.feature_dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.features).all()
    # the absent modality's values must not matter: large garbage, then NaN/inf
    text, audio, visual, a_mask, v_mask = args
    noise = torch.Generator().manual_seed(7)
    for fill in ("noise", "nan"):
        def garbage(x: torch.Tensor, value: float) -> torch.Tensor:
            return torch.randn(x.shape, generator=noise) * 1e4 if fill == "noise" else torch.full_like(x, value)

        bad_a = audio if has_a else garbage(audio, float("nan"))
        bad_v = visual if has_v else garbage(visual, float("inf"))
        other = run(head, (text, bad_a, bad_v, a_mask, v_mask))
        assert (other.logits - out.logits).abs().max().item() <= 1e-6
        assert (other.features - out.features).abs().max().item() <= 1e-6


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["asf", "mag"])
def test_no_nonverbal_gives_layernorm_of_text(name: str, training: bool) -> None:
    """As documented: neither audio nor visual → H = 0 → features == LayerNorm(t) exactly."""
    head = make(name).train(training)
    text, audio, visual, a_mask, v_mask = inputs(3, False, False)
    out = run(head, (text, audio, visual, a_mask, v_mask))
    assert torch.equal(out.features, head.norm(text))
    # with a modality present the shift is not zero
    present = run(head, (text, audio, visual, torch.ones(3), v_mask))
    assert not torch.allclose(present.features, head.norm(text))


@pytest.mark.parametrize("name", HEADS)
def test_mask_forms_agree(name: str) -> None:
    head = make(name).eval()
    text, audio, visual, a_mask, v_mask = inputs(4, [True, False, True, False], [True, True, False, False])
    with torch.no_grad():
        as_float = head(text, audio, visual, a_mask, v_mask).logits
        as_bool = head(text, audio, visual, a_mask.bool(), v_mask.bool()).logits
        as_int = head(text, audio, visual, a_mask.long(), v_mask.long()).logits
        all_none = head(text, audio, visual).logits
        all_ones = head(text, audio, visual, torch.ones(4), torch.ones(4)).logits
    assert torch.equal(as_float, as_bool) and torch.equal(as_float, as_int)
    assert torch.equal(all_none, all_ones)


TEXT_PARAMS = {
    "asf": ["attention.in_proj_weight", "gate.weight"],
    "mag": ["gate_audio.weight"],
    "mult": ["proj_text.weight"],
}


@pytest.mark.parametrize("name", HEADS)
def test_gradients_flow(name: str) -> None:
    head = make(name).train()
    masks = ([True, True, False, True, False, True], [True, False, True, True, False, True])
    text, audio, visual, a_mask, v_mask = inputs(6, *masks)
    text.requires_grad_(True)
    out = head(text, audio, visual, a_mask, v_mask)
    F.cross_entropy(out.logits, torch.arange(6) % C).backward()
    params = dict(head.named_parameters())
    for key, param in params.items():
        assert param.grad is not None, key
        assert torch.isfinite(param.grad).all(), key
    for key in TEXT_PARAMS[name]:
        assert params[key].grad.abs().sum() > 0, key
    assert text.grad is not None and text.grad.abs().sum() > 0
    # no non-verbal input at all: still finite gradients (‖H‖ = 0 must not give NaN)
    head.zero_grad()
    out = head(*inputs(2, False, False))
    out.logits.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", HEADS)
def test_onnx_matches_torch(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    head = make(name).train()  # export must switch to eval itself and restore the flag
    path = export_onnx(head, tmp_path / f"{name}.onnx", opset=17)
    assert head.training
    head.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["text", "audio", "visual", "audio_mask", "visual_mask"]
    for batch, masks in ((1, ([True], [False])), (4, ([True, False, True, False], [True, True, False, False]))):
        args = inputs(batch, *masks, seed=batch)
        with torch.no_grad():
            want = head(*args)
        feed = dict(zip(("text", "audio", "visual", "audio_mask", "visual_mask"), (x.numpy() for x in args)))
        logits, features = session.run(["logits", "features"], feed)
        assert abs(logits - want.logits.numpy()).max() <= 1e-4
        assert abs(features - want.features.numpy()).max() <= 1e-4


@pytest.mark.parametrize("name", HEADS)
def test_bad_input_names_argument(name: str) -> None:
    head = build_fusion_head(name, DT, 256, DV, C, **OPTIONS.get(name, {}))
    text, _, visual, a_mask, v_mask = inputs(4)
    audio = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"audio: expected shape \[B, 256\].*\(4, 300\)"):
        head(text, torch.randn(4, 300), visual, a_mask, v_mask)
    with pytest.raises(ValueError, match="text: expected shape"):
        head(torch.randn(4, DT + 1), audio, visual, a_mask, v_mask)
    with pytest.raises(ValueError, match="visual: batch size 3 does not match the text batch size 4"):
        head(text, audio, visual[:3], a_mask, v_mask)
    with pytest.raises(ValueError, match="visual_mask: expected shape"):
        head(text, audio, visual, a_mask, v_mask[:2])
    with pytest.raises(ValueError, match="audio_mask: expected shape"):
        head(text, audio, visual, a_mask.view(4, 1), v_mask)
