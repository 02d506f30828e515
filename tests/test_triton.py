"""Triton model repositories: every config parsed with Triton's own schema and checked against the ONNX
graph, the vendored preprocess model building exactly StreamingContext's ids, and, where
nvidia-pytriton's bundled tritonserver can run, a real Triton core serving the repository with answers
equal to the offline predictions.

The real-server tests need ``tritonclient[grpc]`` and ``nvidia-pytriton`` (``pip install --no-deps
nvidia-pytriton``: only its tritonserver binary is used, and its numpy<2 pin would downgrade this
project's numpy). That server's Python-backend stub is built against numpy 1.x: under numpy 2 set
``ERC_TRITON_STUB_SITE`` to a folder holding numpy<2 (``pip install --target DIR "numpy<2"``), which the
stub's Python then sees first. Without them those tests skip and say which is missing."""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import types
import venv
from pathlib import Path

import numpy as np
import pytest

from erc_distill.data import ContextBuilder, context_preset, load_corpus
from erc_distill.errors import BundleError
from erc_distill.runtime import Bundle
from erc_distill.serve.triton import (PREPROCESS_MODEL_PY, export_triton, preferred_batch_sizes, summary,
                                      triton_inputs, turn_inputs)

from conftest import make_dialogue, make_tiny_bundle

INT8 = "model-int8-dynamic.onnx"
ORT_TYPES = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32"}
LONG_CHAT = make_dialogue([
    ("Ross", "Hi!"), ("Rachel", "Oh my God! Is that a puppy?"), ("Ross", "It's a duck, Rach. A baby duck."),
    ("Joey", ""), ("Rachel", "Ew. That is disgusting. " * 6), ("Monica", "Don't scare me like that!"),
    ("Ross", "No. It's Joey's."), ("Chandler", "Great news everyone! 🎉"), ("Joey", "MY SANDWICH!"),
    ("Phoebe", "How was the date?"), ("Rachel", "It was amazing!"), ("Ross", "okay well"),
], "long")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A tiny exported bundle with an INT8 graph recorded beside the float one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from erc_distill.export.bundle import record_bundle_file

    folder, _, _ = make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "meld-tiny")
    quantize_dynamic(str(folder / "model.onnx"), str(folder / INT8), weight_type=QuantType.QInt8)
    record_bundle_file(folder, INT8)
    return folder


def parse_config(folder: Path):
    """``folder/config.pbtxt`` parsed with Triton's own ModelConfig schema (an error on any unknown field)."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason='tritonclient is not installed (pip install "tritonclient[grpc]")')
    from google.protobuf import text_format

    return text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def type_name(config, value: int) -> str:
    """The name of a ModelConfig ``data_type`` value (``TYPE_INT64``)."""
    return config.input[0].DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[value].name


# -- the repository on disk ---------------------------------------------------------------------

def test_client_repository_matches_the_graph_triton_will_load(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    result = export_triton(bundle_dir, repo, model_file=INT8, max_batch=16, max_queue_delay_us=2500, instances=2,
                           kind="KIND_GPU", name="meld")
    assert result["entry_model"] == "erc_meld_onnx" and list(result["models"]) == ["erc_meld_onnx"]
    assert sorted(p.name for p in repo.iterdir()) == ["erc_meld_onnx"]  # the graph alone: stateless
    folder = repo / "erc_meld_onnx"
    config = parse_config(folder)
    assert config.name == "erc_meld_onnx" and config.max_batch_size == 16
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert [(g.count, type(g).Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_GPU")]

    # the chosen graph, byte for byte, and its inputs/outputs exactly as ONNX Runtime reads them
    assert (folder / "1" / "model.onnx").read_bytes() == (bundle_dir / INT8).read_bytes()
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for arg, tensor in zip(session.get_inputs(), config.input, strict=True):
        assert tensor.name == arg.name and type_name(config, tensor.data_type) == ORT_TYPES[arg.type]
        per_row = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        assert [-1, *per_row] == [d if isinstance(d, int) else -1 for d in arg.shape]  # batch axis from max_batch_size
        assert all(d == -1 for d in tensor.dims) or list(tensor.dims) == [1]  # sequence: any length
    (out,) = config.output
    (arg,) = session.get_outputs()
    assert out.name == arg.name == "logits" and type_name(config, out.data_type) == "TYPE_FP32"
    assert list(out.dims) == [7] and out.label_filename == "labels.txt"
    labels = (folder / out.label_filename).read_text(encoding="utf-8").splitlines()
    assert tuple(labels) == Bundle.load(bundle_dir).labels
    assert result["files"] == ["erc_meld_onnx/1/model.onnx", "erc_meld_onnx/config.pbtxt", "erc_meld_onnx/labels.txt"]
    assert any("INT8" in n and "CPU" in n for n in result["notes"])  # an INT8 graph on a GPU is worth a word


def test_python_repository_wires_preprocess_into_the_graph(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    result = export_triton(bundle_dir, repo, tokenize="python", max_batch=8, pad_to_max_len=False,
                           max_conversations=50, idle_ttl_s=0)
    assert result["name"] == "meld_tiny" and result["entry_model"] == "erc_meld_tiny"
    configs = {name: parse_config(Path(path)) for name, path in result["models"].items()}
    ensemble, pre, graph = configs["erc_meld_tiny"], configs["erc_meld_tiny_preprocess"], configs["erc_meld_tiny_onnx"]
    assert ensemble.platform == "ensemble" and pre.backend == "python"
    assert {c.max_batch_size for c in configs.values()} == {8}  # an ensemble's batch must fit each step's
    assert [(g.count, type(g).Kind.Name(g.kind)) for g in pre.instance_group] == [(1, "KIND_CPU")]  # contexts in one place
    assert graph.HasField("dynamic_batching") and not pre.HasField("dynamic_batching")  # no queue delay twice
    assert {k: v.string_value for k, v in pre.parameters.items()} == {
        "PAD_TO_MAX_LEN": "false", "MAX_CONVERSATIONS": "50", "IDLE_TTL_S": "0"}
    strings = [(t.name, type_name(pre, t.data_type), list(t.dims)) for t in pre.input]
    assert strings == [(n, "TYPE_STRING", [1]) for n in ("CONVERSATION", "SPEAKER", "TEXT")]
    assert [(t.name, list(t.dims)) for t in ensemble.input] == [(n, d) for n, _, d in strings]

    # the wiring: each step reads only tensors that exist by then, under the names its model declares
    available = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        declared_in = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        assert set(step.input_map) == set(declared_in)
        for key, tensor in step.input_map.items():
            assert available[tensor] == declared_in[key], (step.model_name, key)
        declared_out = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        assert set(step.output_map) <= set(declared_out)
        available.update({tensor: declared_out[key] for key, tensor in step.output_map.items()})
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["erc_meld_tiny_preprocess", "erc_meld_tiny_onnx"]
    for out in ensemble.output:
        assert available[out.name] == (out.data_type, list(out.dims))
    logits = next(o for o in ensemble.output if o.name == "logits")
    assert logits.label_filename == "labels.txt"
    assert (repo / "erc_meld_tiny" / "labels.txt").read_text() == (repo / "erc_meld_tiny_onnx" / "labels.txt").read_text()
    assert (repo / "erc_meld_tiny" / "1").is_dir()

    # the preprocess version folder: the model, the tokenizer and bundle.json as exported
    version = repo / "erc_meld_tiny_preprocess" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["bundle.json", "model.py", "tokenizer.json"]
    for name in ("bundle.json", "tokenizer.json"):
        assert (version / name).read_bytes() == (bundle_dir / name).read_bytes()
    imported = set()
    for node in ast.walk(ast.parse((version / "model.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"json", "os", "time", "collections", "numpy", "tokenizers", "triton_python_backend_utils"}

    text = summary(result)
    assert "call erc_meld_tiny" in text and f"-v {repo.resolve()}:/models" in text and "tokenizers" in text


def test_existing_models_need_overwrite_and_stale_ones_go(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    (repo / "someone_else" / "1").mkdir(parents=True)
    export_triton(bundle_dir, repo, tokenize="python")
    with pytest.raises(FileExistsError, match="erc_meld_tiny_onnx.*overwrite=True"):
        export_triton(bundle_dir, repo)
    export_triton(bundle_dir, repo, overwrite=True)  # back to client-side tokenization
    assert sorted(p.name for p in repo.iterdir()) == ["erc_meld_tiny_onnx", "someone_else"]
    for bad, match in (({"kind": "KIND_TPU"}, "kind"), ({"tokenize": "server"}, "tokenize"),
                       ({"max_batch": 0}, "max_batch"), ({"instances": 0}, "instances"),
                       ({"name": "a/b"}, "name"), ({"max_queue_delay_us": -1}, "max_queue_delay_us")):
        with pytest.raises(ValueError, match=match):
            export_triton(bundle_dir, tmp_path / "other", **bad)
    with pytest.raises(BundleError, match="no-such.onnx"):  # the bundle is checked like Bundle.load does
        export_triton(bundle_dir, tmp_path / "other", model_file="no-such.onnx")
    assert preferred_batch_sizes(1) == [1] and preferred_batch_sizes(48) == [4, 8, 16, 32, 48]


def test_triton_inputs_are_padded_like_bundle_logits(bundle_dir, fixture_data):
    bundle = Bundle.load(bundle_dir)
    (dialogue,) = [d for d in load_corpus("meld", "train", fixture_data).dialogues if len(d) > 2][:1]
    built = bundle.builder().build_dialogue(dialogue)
    pad = bundle.tokenizer.pad_token_id
    for pad_to in (None, bundle.context.max_len):
        arrays = triton_inputs(built, pad_id=pad, pad_to=pad_to)
        width = pad_to or max(map(len, built))
        assert {k: v.shape for k, v in arrays.items()} == {"input_ids": (len(built), width),
                                                           "attention_mask": (len(built), width),
                                                           "mask_index": (len(built), 1)}
        assert all(v.dtype == np.int64 for v in arrays.values())
        feed = {**arrays, "mask_index": arrays["mask_index"].reshape(-1)}  # what Triton's reshape hands the graph
        logits = bundle.session.run(None, feed)[0]
        assert np.allclose(logits, bundle.logits(built), atol=1e-5)
    with pytest.raises(ValueError, match="shorter than the longest"):
        triton_inputs(built, pad_to=3)
    strings = turn_inputs(["c1", "c1"], ["Ross", "Joey"], ["Hi!", "Olá 🎉"])
    assert strings["TEXT"].shape == (2, 1) and strings["TEXT"][1, 0] == "Olá 🎉".encode()


# -- the Python-backend preprocess model, without Triton ---------------------------------------

class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class FakeResponse:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


@pytest.fixture
def preprocess_module(monkeypatch, tmp_path):
    """The generated model.py, imported with a stand-in ``triton_python_backend_utils``."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor
    fake.TritonError = FakeError
    fake.InferenceResponse = FakeResponse
    fake.get_input_tensor_by_name = lambda request, name: FakeTensor(name, request[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)

    def load(version: Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(f"erc_preprocess_{len(list(tmp_path.iterdir()))}",
                                                      version / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def _model(load, bundle_dir: Path, tmp_path: Path, config=None, **params: str):
    """An initialized TritonPythonModel of a repository exported from ``bundle_dir`` (with ``config``
    written into its copy of bundle.json, as a bundle exported with that context would hold)."""
    repo = tmp_path / f"repo{len(list(tmp_path.glob('repo*')))}"
    export_triton(bundle_dir, repo, tokenize="python", name="m")
    version = repo / "erc_m_preprocess" / "1"
    if config is not None:
        meta = json.loads((version / "bundle.json").read_text())
        meta["context"] = dataclasses.asdict(config)
        (version / "bundle.json").write_text(json.dumps(meta))
    model = load(version).TritonPythonModel()
    model_config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    model.initialize({"model_config": json.dumps(model_config), "model_version": "1",
                      "model_repository": str(version.parent)})
    return model


def _request(turns):
    return turn_inputs(*zip(*turns))


CONFIGS = {
    "spcl": context_preset("spcl", max_len=64),
    "spcl-tight": context_preset("spcl", max_len=24),  # drops turns, then cuts the query
    "whole-history": context_preset("spcl", max_len=96, max_previous_turns=None),
    "telme": context_preset("telme", max_len=40),  # index speakers, token truncation, no query
    "utterance": context_preset("utterance", max_len=64),
    "plain": context_preset("plain", max_len=20),  # no prompt: read at [CLS]
    "no-sep": context_preset("spcl", max_len=48, sep_after_each_turn=False, context_truncation="tokens"),
}
CUTS = {"spcl-tight": "query_tokens_cut", "telme": "context_tokens_cut", "no-sep": "context_tokens_cut"}
"""The truncation each tight config must actually reach on the fixture dialogues."""


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_preprocess_builds_exactly_the_streaming_context_ids(preset, bundle_dir, fixture_data, preprocess_module,
                                                             tmp_path):
    config = CONFIGS[preset]
    bundle = Bundle.load(bundle_dir)
    model = _model(preprocess_module, bundle_dir, tmp_path, config, PAD_TO_MAX_LEN="false")
    reference = ContextBuilder(bundle.tokenizer, config)
    dialogues = [*load_corpus("meld", "train", fixture_data).dialogues,
                 *load_corpus("emorynlp", "train", fixture_data).dialogues, LONG_CHAT]
    streams = {d.dialogue_id: reference.stream() for d in dialogues}
    # the conversations interleaved turn by turn, one request per turn
    longest = max(len(d) for d in dialogues)
    checked, cuts = 0, 0
    for i in range(longest):
        for d in dialogues:
            if i >= len(d):
                continue
            turn = d.turns[i]
            expected = streams[d.dialogue_id].push(turn.speaker, turn.text)
            (response,) = model.execute([_request([(d.dialogue_id, turn.speaker, turn.text)])])
            assert response.error is None
            out = response.outputs
            assert out["input_ids"][0].tolist() == list(expected.input_ids), (preset, d.dialogue_id, i)
            assert out["attention_mask"].tolist() == [[1] * len(expected)]
            assert out["mask_index"].tolist() == [[expected.mask_index]] and out["TURN"].tolist() == [[i]]
            checked += 1
            cuts += bool(getattr(expected, CUTS.get(preset, "query_tokens_cut")))
    assert checked == sum(len(d) for d in dialogues) and len(model.conversations) == len(dialogues)
    assert cuts > 0 or preset not in CUTS


@pytest.mark.parametrize("preset", ["spcl", "telme"])
def test_preprocess_matches_a_real_tokenizer(preset, minilm_tokenizer, fixture_data, preprocess_module, tmp_path):
    """A real WordPiece tokenizer with a post-processor (the tiny one has none), against the
    transformers tokenizer the student was trained with."""
    from erc_distill.data.context import add_speaker_tokens

    tok = minilm_tokenizer
    if preset == "telme":
        tok = type(tok).from_pretrained(tok.name_or_path)  # a copy: the session fixture stays as it is
        add_speaker_tokens(tok)
    config = context_preset(preset, max_len=48)
    version = tmp_path / "version"
    version.mkdir()
    (version / "model.py").write_text(PREPROCESS_MODEL_PY)
    from tokenizers import Tokenizer

    saved = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    saved.enable_padding(length=128)  # as the package's tokenizer.json has it, before transformers resets it
    saved.enable_truncation(128)
    saved.save(str(version / "tokenizer.json"))
    special = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id, "pad": tok.pad_token_id}
    (version / "bundle.json").write_text(json.dumps({"tokenizer": "tokenizer.json", "special_ids": special,
                                                     "context": dataclasses.asdict(config)}))
    model = preprocess_module(version).TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": {"PAD_TO_MAX_LEN": {"string_value": "false"}}})})
    reference = ContextBuilder(tok, config)
    for d in [*load_corpus("meld", "train", fixture_data).dialogues, LONG_CHAT]:
        expected = reference.build_dialogue(d)
        for turn, x in zip(d.turns, expected):
            (response,) = model.execute([_request([(d.dialogue_id, turn.speaker, turn.text)])])
            assert response.outputs["input_ids"][0].tolist() == list(x.input_ids)
            assert response.outputs["mask_index"].tolist() == [[x.mask_index]]


def test_preprocess_batches_pads_and_refuses_bad_turns(bundle_dir, preprocess_module, tmp_path):
    bundle = Bundle.load(bundle_dir)
    clock = [0.0]
    model = _model(preprocess_module, bundle_dir, tmp_path, MAX_CONVERSATIONS="2", IDLE_TTL_S="60")
    model.clock = lambda: clock[0]
    reference = bundle.builder().stream()
    expected = [reference.push(t.speaker, t.text) for t in LONG_CHAT.turns[:3]]

    # several rows of one request, and several requests of one execute() (a dynamic batch), in order
    rows = [("a", t.speaker, t.text) for t in LONG_CHAT.turns[:3]]
    first, second = model.execute([_request(rows[:2]), _request(rows[2:])])
    width = bundle.context.max_len  # PAD_TO_MAX_LEN defaults to true: equal shapes batch together
    assert first.outputs["input_ids"].shape == (2, width) and second.outputs["input_ids"].shape == (1, width)
    ids = np.concatenate([first.outputs["input_ids"], second.outputs["input_ids"]])
    mask = np.concatenate([first.outputs["attention_mask"], second.outputs["attention_mask"]])
    for row, m, x in zip(ids, mask, expected):
        assert row[: len(x)].tolist() == list(x.input_ids) and m.sum() == len(x)
        assert (row[len(x):] == bundle.tokenizer.pad_token_id).all()
    assert np.concatenate([first.outputs["TURN"], second.outputs["TURN"]]).ravel().tolist() == [0, 1, 2]

    # a bad turn fails its own request only, and leaves the conversation as it was
    bad, good = model.execute([_request([("a", "Ross", "x" * 2001)]), _request([("a", "Ross", "Hi")])])
    assert bad.error is not None and "2001 characters" in bad.error.message() and not bad.outputs
    assert good.error is None and good.outputs["TURN"].tolist() == [[3]]
    (bad,) = model.execute([{**_request([("a", "Ross", "Hi")]), "TEXT": np.array([[b"\xff"]], dtype=object)}])
    assert bad.error is not None and "utf-8" in bad.error.message().lower()

    # least recently used conversations beyond MAX_CONVERSATIONS, and idle ones, are forgotten
    model.execute([_request([("b", "Joey", "Hi")])])
    model.execute([_request([("c", "Joey", "Hi")])])  # a is the least recently used of three
    assert list(model.conversations) == ["b", "c"]
    clock[0] = 61.0
    (again,) = model.execute([_request([("b", "Joey", "Hi")])])
    assert again.outputs["TURN"].tolist() == [[0]] and list(model.conversations) == ["b"]  # c expired, b anew


# -- a real Triton core (nvidia-pytriton's bundled tritonserver) ---------------------------------

STAND_IN_MODEL_PY = '''"""Test stand-in for Triton's ONNX Runtime backend (pytriton's server ships the Python backend
only): runs 1/model.onnx with onnxruntime, under the generated config's name, tensors and batching."""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.dirname(os.path.abspath(__file__))
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        out = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    for name in ("input_ids", "attention_mask", "mask_index")}
            feed["mask_index"] = feed["mask_index"].reshape(-1)
            logits = self.session.run(None, feed)[0]
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
        return out
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _triton_or_skip(work: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that run pytriton's tritonserver with a Python-backend
    stub for this interpreter; pytest.skip with the reason where it cannot run here."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-pytriton is not installed (it bundles tritonserver with the Python backend: "
                    "pip install --no-deps nvidia-pytriton)")
    home = Path(list(spec.submodule_search_locations)[0])
    server, libs = home / "tritonserver" / "bin" / "tritonserver", home.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = home / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not server.is_file() or not stub.is_file():
        pytest.skip(f"nvidia-pytriton at {home} has no tritonserver or no Python-backend stub for Python {version}")
    python_lib = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    if python_lib is None:
        pytest.skip(f"this Python ({sys.executable}) is not built with a shared libpython, which Triton's "
                    "Python-backend stub loads")
    stub_site = os.environ.get("ERC_TRITON_STUB_SITE")
    if int(np.__version__.split(".")[0]) >= 2 and not stub_site:
        pytest.skip(f"the Python-backend stub in nvidia-pytriton is built against numpy 1.x and garbles tensors "
                    f"under numpy {np.__version__} (reads [1, 2, 3] as [1, 1, 1]); set ERC_TRITON_STUB_SITE to a "
                    "folder holding numpy<2 (pip install --target DIR 'numpy<2')")

    # the server's backends: the Python backend, with the stub of this interpreter
    backends = work / "backends" / "python"
    backends.mkdir(parents=True)
    for item in (home / "tritonserver" / "backends" / "python").iterdir():
        (backends / item.name).symlink_to(item)
    (backends / "triton_python_backend_stub").symlink_to(stub)
    # the stub's Python: this environment's packages (not the editable erc_distill: the models must
    # not need it), behind numpy<2 where this environment has numpy 2
    env_dir = work / "stub-env"
    venv.create(env_dir, with_pip=False, symlinks=True)
    (site,) = env_dir.glob("lib/python*/site-packages")
    paths = [stub_site] if stub_site else []
    paths += dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "erc-triton-test.pth").write_text("".join(f"{p}\n" for p in paths))
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": ":".join(filter(None, [str(libs), python_lib, os.environ.get("LD_LIBRARY_PATH")]))}
    probe = subprocess.run([str(server), "--help"], env=env, capture_output=True, text=True, timeout=30)
    if "Usage: tritonserver" not in probe.stdout + probe.stderr:
        pytest.skip(f"pytriton's tritonserver does not run here: {(probe.stderr or probe.stdout).strip()[-500:]}")
    return [str(server), f"--backend-directory={work / 'backends'}"], env


@pytest.fixture(scope="module")
def triton(bundle_dir, tmp_path_factory):
    """A real Triton server on the python-tokenize repository; (gRPC client, result, log file)."""
    grpcclient = pytest.importorskip("tritonclient.grpc", reason='pip install "tritonclient[grpc]"')
    from google.protobuf import text_format

    work = tmp_path_factory.mktemp("triton")
    command, env = _triton_or_skip(work)
    repo = work / "repo"
    result = export_triton(bundle_dir, repo, tokenize="python", name="meld", max_batch=8, max_queue_delay_us=20_000)
    # the ONNX Runtime backend is not in pytriton's server: the same config and graph, run by a stand-in
    onnx_dir = repo / "erc_meld_onnx"
    config = parse_config(onnx_dir)
    config.ClearField("platform")
    config.backend = "python"
    (onnx_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    (onnx_dir / "1" / "model.py").write_text(STAND_IN_MODEL_PY)

    grpc_port = _free_port()
    log = work / "tritonserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*command, f"--model-repository={repo}", f"--grpc-port={grpc_port}",
                                    f"--http-port={_free_port()}", "--allow-metrics=false"],
                                   env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited ({process.returncode}) loading the exported repository:\n"
                            + log.read_text(errors="replace")[-4000:])
            try:
                if client.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail("tritonserver not ready after 90 s:\n" + log.read_text(errors="replace")[-4000:])
            time.sleep(0.2)
        yield client, result, log
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _infer(client, model: str, arrays: dict[str, np.ndarray], datatype: str, class_count: int = 0):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array)
    outputs = [grpcclient.InferRequestedOutput("logits", class_count=class_count)]
    if model.endswith("_onnx"):
        return client.infer(model, inputs, outputs=outputs)
    return client.infer(model, inputs, outputs=[*outputs, grpcclient.InferRequestedOutput("TURN")])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_real_triton_ensemble_answers_like_the_offline_bundle(triton, bundle_dir, fixture_data):
    client, result, _ = triton
    assert {m for m in result["models"]} <= {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
    bundle = Bundle.load(bundle_dir)
    dialogues = [*load_corpus("meld", "train", fixture_data).dialogues, LONG_CHAT]
    offline = {d.dialogue_id: bundle.probabilities(bundle.builder().build_dialogue(d)) for d in dialogues}
    for i in range(max(len(d) for d in dialogues)):  # conversations interleaved, turns in order
        for d in dialogues:
            if i >= len(d):
                continue
            turn = d.turns[i]
            arrays = turn_inputs([f"robot-1/{d.dialogue_id}"], [turn.speaker], [turn.text])
            answer = _infer(client, "erc_meld", arrays, "BYTES")
            assert answer.as_numpy("TURN").tolist() == [[i]]
            assert np.allclose(_softmax(answer.as_numpy("logits"))[0], offline[d.dialogue_id][i], atol=1e-5)
    # the classification extension answers the bundle's labels, from labels.txt
    turn = LONG_CHAT.turns[0]
    top = _infer(client, "erc_meld", turn_inputs(["fresh"], [turn.speaker], [turn.text]), "BYTES", class_count=3)
    value, index, label = top.as_numpy("logits")[0, 0].decode().split(":")
    assert bundle.labels[int(index)] == label
    assert bundle.labels[int(offline[LONG_CHAT.dialogue_id][0].argmax())] == label


def test_real_triton_onnx_model_batches_client_built_inputs(triton, bundle_dir, fixture_data):
    client, result, _ = triton
    bundle = Bundle.load(bundle_dir)
    built = [x for d in load_corpus("meld", "train", fixture_data).dialogues for x in bundle.builder().build_dialogue(d)]
    pad, size = bundle.tokenizer.pad_token_id, result["max_batch"]
    assert len(built) > size  # a request holds at most max_batch rows: send them in chunks
    logits = [_infer(client, "erc_meld_onnx", triton_inputs(built[i: i + size], pad_id=pad), "INT64").as_numpy("logits")
              for i in range(0, len(built), size)]
    assert np.allclose(np.concatenate(logits), bundle.logits(built), atol=1e-5)

    # robots each sending one turn, padded to max_len: the dynamic batcher merges them
    before = _executions(client, "erc_meld_onnx")
    with concurrent.futures.ThreadPoolExecutor(len(built)) as pool:
        answers = list(pool.map(lambda x: _infer(client, "erc_meld_onnx", triton_inputs(
            [x], pad_id=pad, pad_to=bundle.context.max_len), "INT64").as_numpy("logits")[0], built))
    assert np.allclose(np.stack(answers), bundle.logits(built), atol=1e-5)
    inferences, executions = (a - b for a, b in zip(_executions(client, "erc_meld_onnx"), before))
    assert inferences == len(built) and executions < len(built)  # some executions ran several requests


def _executions(client, model: str) -> tuple[int, int]:
    (stats,) = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
