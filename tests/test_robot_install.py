"""The light robot install: `pip install erc-distill` (no extras) brings ONNX Runtime, tokenizers and numpy,
none of torch, Lightning or NNCF, and `stream` and `profile` work with it on an exported bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from conftest import REPO, make_tiny_bundle

HEAVY = ("torch", "lightning", "nncf", "transformers", "torchmetrics", "onnx", "matplotlib")


def test_the_base_requirements_are_light():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {r.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip() for r in project["dependencies"]}
    assert {"onnxruntime", "tokenizers", "numpy"} <= names and not names & set(HEAVY)
    train = " ".join(project["optional-dependencies"]["train"])
    assert "torch==" in train and "lightning" in train and "nncf" in train
    for extra in ("models", "dev"):  # the README's two commands still get everything
        assert "erc-distill[train]" in project["optional-dependencies"][extra]


@pytest.fixture(scope="module")
def robot_env(tmp_path_factory) -> Path:
    """A fresh virtual environment with only `pip install <this project>` (about 15 s from the local index)."""
    env = tmp_path_factory.mktemp("robot") / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the robot install failed:\n{done.stderr[-3000:]}")
    return python


def test_stream_and_profile_run_on_the_robot_install(robot_env, tmp_path, fixture_data):
    installed = subprocess.run([str(robot_env), "-m", "pip", "list", "--format", "json"], capture_output=True,
                               text=True, check=True)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "onnxruntime" in names and not names & set(HEAVY)
    bundle, _, _ = make_tiny_bundle(tmp_path / "bundle")
    cli = robot_env.parent / "erc-distill"
    lines = '{"conversation": "a", "speaker": "Ross", "text": "Hi!"}\nnot json\n' \
            '{"conversation": "a", "speaker": "Rachel", "text": "Oh my God!"}\n'
    done = subprocess.run([str(cli), "stream", "--bundle", str(bundle)], input=lines, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in done.stdout.splitlines()]
    assert [o.get("turn") for o in out] == [0, None, 1] and "error" in out[1]
    assert out[2]["label"] in out[2]["probabilities"]
    report = tmp_path / "profile.json"
    done = subprocess.run([str(cli), "profile", "--bundle", str(bundle), "--data-dir", str(fixture_data),
                           "--turns", "5", "--warmup", "1", "--json", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert 1 <= result["turns"] <= 5 and result["p99_ms"] > 0 and result["machine"]["cpu"]["model"]
    # a broken bundle is one line naming the file, on the robot too
    (bundle / "model.onnx").write_bytes(b"")
    done = subprocess.run([str(cli), "stream", "--bundle", str(bundle)], input="", capture_output=True, text=True)
    assert done.returncode == 1 and "model.onnx" in done.stderr and "Traceback" not in done.stderr
    assert sys.version_info >= (3, 10)
