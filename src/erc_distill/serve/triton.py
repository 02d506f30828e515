"""Scale-out on NVIDIA Triton Inference Server: an exported bundle as a Triton model repository.

:func:`export_triton` writes, into a model repository folder, models that the stock NGC Triton
container serves with no code of ours:

``erc_<name>_onnx``
    the bundle's graph (``model.onnx``, or an INT8 ``model-int8-<method>.onnx`` with ``model_file=``)
    as ``1/model.onnx`` for the ONNX Runtime backend, with dynamic batching, an instance group, and
    ``labels.txt`` as the ``label_filename`` of ``logits`` (so Triton's classification extension
    answers labels). Inputs, per batch row: ``input_ids`` [-1] and ``attention_mask`` [-1] (INT64),
    ``mask_index`` [1] (INT64, reshaped to the graph's scalar); output ``logits`` [C] (FP32).

With ``tokenize="python"`` two more:

``erc_<name>_preprocess``
    a Python-backend model (``1/model.py``, self-contained: it needs numpy and ``tokenizers``, not
    erc_distill) that keeps each conversation's rolling context, exactly as
    :class:`~erc_distill.data.context.StreamingContext` does, and builds the next turn's input from
    ``CONVERSATION``, ``SPEAKER`` and ``TEXT`` (strings). It runs as ONE instance: the contexts live
    in its memory.
``erc_<name>``
    an ensemble, preprocess -> onnx: strings in, ``logits`` (with labels) and ``TURN`` (the turn's
    0-based index in its conversation) out. This is the model a robot calls.

With ``tokenize="client"`` (the default) the repository holds only the ONNX model and is stateless:
the robot builds the input with :mod:`erc_distill.runtime` (light: onnxruntime is not even needed
for that) and sends it; any number of Triton servers behind any load balancer answer alike. With
``tokenize="python"`` the contexts live in one server: put several servers behind a balancer that
routes by conversation id (sticky), or use ``tokenize="client"``.

Serving (the NGC container; ``<yy.mm>`` e.g. ``24.10``, add ``--gpus=all`` for ``kind="KIND_GPU"``)::

    docker run --rm -p8000:8000 -p8001:8001 -v $PWD/REPO:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models

The container has Python and numpy but not ``tokenizers``: for ``tokenize="python"`` install it
first (``... nvcr.io/nvidia/tritonserver:<yy.mm>-py3 sh -c "pip install tokenizers &&
tritonserver --model-repository=/models"``, or a two-line Dockerfile ``FROM`` that image with
``RUN pip install tokenizers``). ``tokenize="client"`` needs nothing more.

How a robot talks to it (``pip install "tritonclient[http]"``), ``tokenize="client"``::

    import tritonclient.http as httpclient
    from erc_distill.runtime import Bundle
    from erc_distill.serve.triton import triton_inputs

    bundle = Bundle.load("bundle")                  # only the tokenizer and context config are used
    context = bundle.builder().stream()              # one per conversation
    client = httpclient.InferenceServerClient("localhost:8000")
    arrays = triton_inputs([context.push("Ross", "Hi!")], pad_id=bundle.tokenizer.pad_token_id)
    inputs = []
    for name, array in arrays.items():
        inputs.append(httpclient.InferInput(name, list(array.shape), "INT64"))
        inputs[-1].set_data_from_numpy(array)
    result = client.infer("erc_NAME_onnx", inputs,
                          outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    logits = result.as_numpy("logits")             # with class_count: [[b"12.3:1:joy", ...]]

and ``tokenize="python"`` (strings in, the server keeps the context)::

    arrays = turn_inputs(["robot-7/session-3"], ["Ross"], ["Hi!"])
    inputs = []
    for name, array in arrays.items():
        inputs.append(httpclient.InferInput(name, list(array.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(array)
    result = client.infer("erc_NAME", inputs, outputs=[httpclient.InferRequestedOutput("logits", class_count=1)])
    label = result.as_numpy("logits")[0, 0].decode().split(":")[2]

Send the turns of one conversation in order, each after the previous one's answer (the context
is the order of arrival); a new conversation id starts a new context.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.runtime.bundle import INPUTS

__all__ = ["export_triton", "summary", "triton_inputs", "turn_inputs", "preferred_batch_sizes",
           "PREPROCESS_MODEL_PY"]

KINDS = ("KIND_CPU", "KIND_GPU")
TOKENIZE = ("client", "python")
LABELS_FILE = "labels.txt"
STRING_INPUTS = ("CONVERSATION", "SPEAKER", "TEXT")
TURN_OUTPUT = "TURN"
DOCKER = ("docker run --rm -p8000:8000 -p8001:8001 -v {repo}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
          "tritonserver --model-repository=/models")

_ONNX_TYPES = {
    "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int16)": "TYPE_INT16",
    "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL",
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16",
}


# -- the client side ----------------------------------------------------------------------------

def triton_inputs(builder_inputs: Iterable[Any], *, pad_id: int = 0,
                  pad_to: int | None = None) -> dict[str, np.ndarray]:
    """The ``erc_<name>_onnx`` request tensors of built inputs (:class:`~erc_distill.data.context.ModelInput` s,
    from ``Bundle.builder()`` / ``StreamingContext.push``), padded into one batch as
    :meth:`Bundle.logits <erc_distill.runtime.Bundle.logits>` pads them.

    Returns ``{"input_ids": [B, T], "attention_mask": [B, T], "mask_index": [B, 1]}`` (int64;
    ``mask_index`` has the trailing 1 of the model config's ``dims: [1]``). ``pad_id``: the bundle's
    pad token (``bundle.tokenizer.pad_token_id``; masked positions do not change the logits);
    ``pad_to``: pad to this width instead of the longest input (e.g. the context's ``max_len``, so
    that Triton's dynamic batcher can merge requests from different robots: it merges equal shapes).
    """
    inputs = list(builder_inputs)
    if not inputs:
        raise ValueError("no inputs to send")
    width = max(len(x.input_ids) for x in inputs)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest input ({width} tokens)")
        width = pad_to
    ids = np.full((len(inputs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(inputs), width), dtype=np.int64)
    for i, x in enumerate(inputs):
        ids[i, : len(x.input_ids)] = x.input_ids
        mask[i, : len(x.input_ids)] = 1
    index = np.array([[x.mask_index] for x in inputs], dtype=np.int64)
    return dict(zip(INPUTS, (ids, mask, index)))


def turn_inputs(conversations: Sequence[str], speakers: Sequence[str], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The ``erc_<name>`` (ensemble, ``tokenize="python"``) request tensors of B turns: UTF-8 byte
    strings of shape [B, 1] for ``CONVERSATION``, ``SPEAKER`` and ``TEXT`` (Triton type BYTES)."""
    if not len(conversations) == len(speakers) == len(texts):
        raise ValueError(f"{len(conversations)} conversation ids, {len(speakers)} speakers and {len(texts)} texts")
    if not texts:
        raise ValueError("no turns to send")
    return {name: np.array([[str(v).encode("utf-8")] for v in values], dtype=np.object_)
            for name, values in zip(STRING_INPUTS, (conversations, speakers, texts))}


# -- the repository -----------------------------------------------------------------------------

def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to ``max_batch``, and ``max_batch`` itself (``[1]`` for 1)."""
    sizes = {max_batch}
    size = 4
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def default_name(bundle_dir: str | Path) -> str:
    """The bundle's run name as a Triton model name part (lower case, ``[a-z0-9_]``): the folder's own
    name, or its run folder's when it is the pipeline's ``runs/NAME/bundle``."""
    folder = Path(bundle_dir).resolve()
    if folder.name == "bundle" and folder.parent.name:
        folder = folder.parent
    name = re.sub(r"[^a-z0-9_]+", "_", folder.name.lower()).strip("_")
    return name or "model"


def export_triton(bundle_dir: str | Path, repo_dir: str | Path, *, model_file: str | None = None,
                  max_batch: int = 32, max_queue_delay_us: int = 5000, instances: int = 1,
                  kind: str = "KIND_CPU", tokenize: str = "client", name: str | None = None,
                  pad_to_max_len: bool = True, max_conversations: int = 1000, idle_ttl_s: float = 3600.0,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write a Triton model repository for the bundle at ``bundle_dir`` into ``repo_dir``.

    The bundle is loaded and checked first (:meth:`Bundle.load`, checksums included): ``model_file``
    picks another graph of the bundle (e.g. ``model-int8-dynamic.onnx``), copied byte for byte.
    ``max_batch``: the models' ``max_batch_size``; ``max_queue_delay_us``: how long the dynamic
    batcher waits to fill a batch; ``instances`` x ``kind``: the ONNX model's instance group.
    ``tokenize``: ``"client"`` (only the ONNX model) or ``"python"`` (plus the preprocess model and
    the ensemble ``erc_<name>``; see the module docstring). ``name``: the ``<name>`` part (default:
    the bundle folder's name). ``pad_to_max_len`` (python only): the preprocess pads every turn to
    the context's ``max_len``, so that the dynamic batcher can merge turns of different lengths
    (it only merges equal shapes); False sends each turn unpadded, which costs less compute per
    turn but leaves every turn in a batch of its own. ``max_conversations``/``idle_ttl_s``: the
    preprocess model forgets least-recently-used conversations beyond that count, and those idle
    that long (0: never). Existing ``erc_<name>*`` models in ``repo_dir`` are an error unless
    ``overwrite`` (then they are replaced; other models in the repository are left alone).

    Returns a dict for :func:`summary` and scripts: ``repository``, ``name``, ``tokenize``,
    ``entry_model`` (the model to call), ``models`` (name -> folder), ``model_file``, ``labels``,
    ``inputs``/``outputs`` of the entry model (name -> ``{"data_type", "dims"}``), ``max_batch``,
    ``preferred_batch_sizes``, ``max_queue_delay_us``, ``instances``, ``kind``, ``files`` (paths
    relative to the repository) and ``notes``.
    """
    from erc_distill.runtime.bundle import Bundle

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if tokenize not in TOKENIZE:
        raise ValueError(f"tokenize must be one of {', '.join(TOKENIZE)}, got {tokenize!r}")
    for key, value, low in (("max_batch", max_batch, 1), ("max_queue_delay_us", max_queue_delay_us, 0),
                            ("instances", instances, 1), ("max_conversations", max_conversations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    if not idle_ttl_s >= 0:
        raise ValueError(f"idle_ttl_s must be >= 0 (0: never expire), got {idle_ttl_s!r}")
    name = default_name(bundle_dir) if name is None else name
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-' (not starting with '.' or '-'), got {name!r}")

    bundle_dir, repo = Path(bundle_dir), Path(repo_dir)
    bundle = Bundle.load(bundle_dir, model_file=model_file)
    graph = bundle_dir / bundle.model_file
    labels = list(bundle.labels)
    onnx_inputs, onnx_outputs = _graph_tensors(bundle, graph)
    if tokenize == "python" and any(t["data_type"] != "TYPE_INT64" for t in onnx_inputs):
        raise ValueError(f"{graph}: the preprocess model sends int64 inputs, the graph takes "
                         f"{[(t['name'], t['data_type']) for t in onnx_inputs]}")

    names = {"onnx": f"erc_{name}_onnx", "preprocess": f"erc_{name}_preprocess", "ensemble": f"erc_{name}"}
    ours = [names["onnx"]] + ([names["preprocess"], names["ensemble"]] if tokenize == "python" else [])
    existing = [n for n in names.values() if (repo / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{repo}: already holds {', '.join(existing)} (pass overwrite=True to replace)")
    for n in existing:  # all three, so that no stale ensemble outlives a switch to tokenize="client"
        shutil.rmtree(repo / n)
    repo.mkdir(parents=True, exist_ok=True)

    sizes = preferred_batch_sizes(max_batch)
    batching = _dynamic_batching(sizes, max_queue_delay_us)
    label_text = "".join(label + "\n" for label in labels)

    # the ONNX model
    onnx_dir = repo / names["onnx"]
    (onnx_dir / "1").mkdir(parents=True)
    shutil.copyfile(graph, onnx_dir / "1" / "model.onnx")
    (onnx_dir / LABELS_FILE).write_text(label_text, encoding="utf-8")
    lines = [f'name: "{names["onnx"]}"', 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
             f"max_batch_size: {max_batch}", "input ["]
    lines += _tensor_list(onnx_inputs) + ["]", "output ["] + _tensor_list(onnx_outputs, labels=True) + ["]"]
    lines += batching + [f"instance_group [ {{ count: {instances} kind: {kind} }} ]"]
    _write_config(onnx_dir, lines)

    entry, inputs, outputs = names["onnx"], onnx_inputs, onnx_outputs
    notes: list[str] = []
    if tokenize == "python":
        seq = [t for t in onnx_inputs if t["name"] != "mask_index"]
        pre_dir = repo / names["preprocess"]
        (pre_dir / "1").mkdir(parents=True)
        (pre_dir / "1" / "model.py").write_text(PREPROCESS_MODEL_PY, encoding="utf-8")
        shutil.copyfile(bundle_dir / "bundle.json", pre_dir / "1" / "bundle.json")
        shutil.copyfile(bundle_dir / bundle.meta["tokenizer"], pre_dir / "1" / bundle.meta["tokenizer"])
        strings = [{"name": n, "data_type": "TYPE_STRING", "dims": [1]} for n in STRING_INPUTS]
        pre_out = [*({"name": t["name"], "data_type": "TYPE_INT64", "dims": [-1]} for t in seq),
                   {"name": "mask_index", "data_type": "TYPE_INT64", "dims": [1]},
                   {"name": TURN_OUTPUT, "data_type": "TYPE_INT64", "dims": [1]}]
        params = {"PAD_TO_MAX_LEN": "true" if pad_to_max_len else "false",
                  "MAX_CONVERSATIONS": str(max_conversations), "IDLE_TTL_S": f"{float(idle_ttl_s):g}"}
        lines = [f'name: "{names["preprocess"]}"', 'backend: "python"', f"max_batch_size: {max_batch}", "input ["]
        lines += _tensor_list(strings) + ["]", "output ["] + _tensor_list(pre_out) + ["]"]
        # no dynamic batching: it would hold each turn for the queue delay, and this model runs its
        # requests one by one anyway (the ONNX model behind it batches)
        lines += ["# ONE instance on the CPU: the conversations' contexts live in its memory",
                  "instance_group [ { count: 1 kind: KIND_CPU } ]"]
        lines += [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
        _write_config(pre_dir, lines)

        ens_dir = repo / names["ensemble"]
        (ens_dir / "1").mkdir(parents=True)  # an ensemble needs its (empty) version folder
        (ens_dir / LABELS_FILE).write_text(label_text, encoding="utf-8")
        ens_out = [*onnx_outputs, {"name": TURN_OUTPUT, "data_type": "TYPE_INT64", "dims": [1]}]
        pre_map = {t["name"]: t["name"] for t in pre_out}
        lines = [f'name: "{names["ensemble"]}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}", "input ["]
        lines += _tensor_list(strings) + ["]", "output ["] + _tensor_list(onnx_outputs, labels=True)
        lines[-1] += ","
        lines += _tensor_list(ens_out[-1:]) + ["]", "ensemble_scheduling {", "  step ["]
        lines += _step(names["preprocess"], {n: n for n in STRING_INPUTS}, pre_map) + ["    ,"]
        lines += _step(names["onnx"], {t["name"]: t["name"] for t in onnx_inputs},
                       {t["name"]: t["name"] for t in onnx_outputs})
        lines += ["  ]", "}"]
        _write_config(ens_dir, lines)
        entry, inputs, outputs = names["ensemble"], strings, ens_out
        notes.append(f"{names['preprocess']} needs `tokenizers` in the server's Python (pip install tokenizers)")
        notes.append("the conversations' contexts live in this server: route a conversation to one server")
        if not pad_to_max_len:
            notes.append("pad_to_max_len=False: turns of different lengths are never batched together")
    if kind == "KIND_GPU" and "int8" in bundle.model_file.lower():
        notes.append(f"{bundle.model_file} is a CPU INT8 graph: ONNX Runtime's CUDA provider runs its "
                     "quantized operators on the CPU; serve the float graph on a GPU")

    files = sorted(str(p.relative_to(repo)) for n in ours for p in (repo / n).rglob("*") if p.is_file())
    return {
        "repository": str(repo), "name": name, "tokenize": tokenize, "entry_model": entry,
        "models": {n: str(repo / n) for n in ours}, "model_file": bundle.model_file,
        "bundle": str(bundle_dir), "labels": labels,
        "inputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"]} for t in inputs},
        "outputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"]} for t in outputs},
        "max_batch": max_batch, "preferred_batch_sizes": sizes, "max_queue_delay_us": max_queue_delay_us,
        "instances": instances, "kind": kind, "files": files, "notes": notes,
    }


def summary(result: dict[str, Any]) -> str:
    """A few lines on what :func:`export_triton` wrote and how to serve it."""
    models = result["models"]
    head = (f"Triton model repository {result['repository']} ({len(models)} model{'s' * (len(models) > 1)}, "
            f"tokenize={result['tokenize']}); call {result['entry_model']}")
    lines = [head]
    ins = ", ".join(f"{k} {v['data_type'][5:]}{v['dims']}" for k, v in result["inputs"].items())
    outs = ", ".join(f"{k} {v['data_type'][5:]}{v['dims']}" for k, v in result["outputs"].items())
    lines.append(f"  inputs  {ins}")
    lines.append(f"  outputs {outs} (labels: {', '.join(result['labels'])})")
    lines.append(f"  graph   {result['model_file']} from {result['bundle']}; max batch {result['max_batch']} "
                 f"(preferred {result['preferred_batch_sizes']}, queue delay {result['max_queue_delay_us']} us), "
                 f"{result['instances']} x {result['kind']}")
    lines.append("  serve   " + DOCKER.format(repo=Path(result["repository"]).resolve()))
    lines += [f"  note    {n}" for n in result["notes"]]
    return "\n".join(lines)


def _graph_tensors(bundle: Any, graph: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The graph's inputs and logits output as config tensors (dims without the batch axis)."""
    def dims(arg: Any) -> list[int]:
        shape = list(arg.shape or [])
        if not shape or isinstance(shape[0], int):
            raise ValueError(f"{graph}: {arg.name} has shape {shape}, without the dynamic batch axis Triton's "
                             "batching needs")
        return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]

    def dtype(arg: Any) -> str:
        if arg.type not in _ONNX_TYPES:
            raise ValueError(f"{graph}: {arg.name} is a {arg.type}, which this exporter cannot map to Triton")
        return _ONNX_TYPES[arg.type]

    inputs = []
    for arg in sorted(bundle.session.get_inputs(), key=lambda a: INPUTS.index(a.name)):
        d = dims(arg)
        tensor: dict[str, Any] = {"name": arg.name, "data_type": dtype(arg), "dims": d or [1]}
        if not d:
            tensor["reshape"] = []  # a [B] graph input: Triton needs dims [1]; reshape to the scalar per row
        inputs.append(tensor)
    out = bundle.session.get_outputs()[0]
    dims(out)  # checks the batch axis
    outputs = [{"name": out.name, "data_type": dtype(out), "dims": [len(bundle.labels)]}]
    return inputs, outputs


def _tensor_list(tensors: list[dict[str, Any]], labels: bool = False) -> list[str]:
    out = []
    for i, t in enumerate(tensors):
        body = f'name: "{t["name"]}" data_type: {t["data_type"]} dims: [ {", ".join(map(str, t["dims"]))} ]'
        if "reshape" in t:
            body += f' reshape: {{ shape: [ {", ".join(map(str, t["reshape"]))} ] }}'
        if labels:
            body += f' label_filename: "{LABELS_FILE}"'
        out.append(f"  {{ {body} }}" + ("," if i < len(tensors) - 1 else ""))
    return out


def _dynamic_batching(sizes: list[int], delay_us: int) -> list[str]:
    return ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, sizes))} ]",
            f"  max_queue_delay_microseconds: {delay_us}", "}"]


def _step(model: str, input_map: dict[str, str], output_map: dict[str, str]) -> list[str]:
    lines = ["    {", f'      model_name: "{model}"', "      model_version: -1"]
    lines += [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in input_map.items()]
    lines += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in output_map.items()]
    return lines + ["    }"]


def _write_config(folder: Path, lines: list[str]) -> None:
    (folder / "config.pbtxt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- the Python-backend preprocess model (written as erc_<name>_preprocess/1/model.py) ----------

PREPROCESS_MODEL_PY = r'''"""ERC preprocessing for Triton's Python backend (written by erc_distill.serve.triton).

Per batch row: CONVERSATION, SPEAKER, TEXT (UTF-8 strings) in; input_ids and attention_mask [T]
(int64; T = the context's max_len with PAD_TO_MAX_LEN, else the request's longest row), mask_index
[1] and TURN [1] (the turn's 0-based index in its conversation) out. Each conversation's last
max_previous_turns + 1 turns are kept in this instance's memory, so the model runs as ONE instance;
conversations beyond MAX_CONVERSATIONS (least recently used first) and those idle for IDLE_TTL_S
seconds are forgotten. A turn that cannot be used (not UTF-8, over MAX_TEXT_CHARS / MAX_NAME_CHARS,
a prompt that does not fit max_len) fails its request and leaves its conversation unchanged
(in a request of several rows, the rows before it stay pushed).

Builder is a copy of erc_distill.data.context.ContextBuilder/StreamingContext (the same ids;
erc-distill's tests check it). Needs numpy and tokenizers; reads bundle.json and the tokenizer
file beside this one.
"""

import json
import os
import time
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

MASK = "{mask}"


class Builder:
    def __init__(self, tokenizer, context, special):
        self.tok = tokenizer
        self.max_len = int(context["max_len"])
        self.k = context["max_previous_turns"]
        self.turn_template = context["turn_template"]
        self.query_prefix = context["query_prefix"]
        self.prompt_template = context["prompt_template"]
        self.sep_each = bool(context["sep_after_each_turn"])
        self.index_speakers = context["speaker_style"] == "index"
        self.cut_tokens = context["context_truncation"] == "tokens"
        self.cls, self.sep, self.mask, self.pad = (int(special[k]) for k in ("cls", "sep", "mask", "pad"))
        self.prefix = self.ids(self.query_prefix) if self.query_prefix is not None else []
        self.fixed = 1 + (len(self.prefix) + 1 if self.query_prefix is not None else 0)
        self.prompts = {}

    def ids(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode(self, label, text):
        """(speaker label, ids, ids with a leading space) of one turn."""
        rendered = self.turn_template.format(speaker=label, text=text)
        return label, tuple(self.ids(rendered)), tuple(self.ids(" " + rendered))

    def prompt(self, speaker):
        if self.prompt_template is None:
            return ()
        if speaker not in self.prompts:
            before, after = self.prompt_template.format(speaker=speaker, mask=MASK).split(MASK)
            ids = (*(self.ids(before.rstrip()) if before.strip() else ()), self.mask,
                   *(self.ids(after) if after.strip() else ()), self.sep)
            if len(self.prompts) >= 4096:
                self.prompts.clear()
            self.prompts[speaker] = ids
        return self.prompts[speaker]

    def assemble(self, window):
        """(ids, mask index) of the last turn of ``window`` (encoded turns, oldest first)."""
        prompt = self.prompt(window[-1][0])
        query = window[-1][2] if self.query_prefix is not None else ()
        budget = self.max_len - self.fixed - len(prompt) - len(query)
        if budget < 0:
            if self.query_prefix is None or -budget > len(query):
                raise ValueError(f"max_len={self.max_len} cannot hold the prompt ({len(prompt)} tokens with "
                                 f"[SEP]) plus {self.fixed} special/query-prefix tokens")
            query, budget = query[-budget:], 0
        ids = [self.cls, *self.context(window, budget)]
        if self.query_prefix is not None:
            ids += [*self.prefix, *query, self.sep]
        ids += prompt
        if prompt:
            return ids, len(ids) - 1 - prompt[::-1].index(self.mask)
        if ids[-1] != self.sep:
            ids.append(self.sep)
        return ids, 0

    def pieces(self, turns):
        if self.sep_each:
            return [(*t[1], self.sep) for t in turns], 0
        return [turns[0][1], *(t[2] for t in turns[1:])], 1

    def context(self, window, budget):
        if not self.cut_tokens:  # whole turns: the earliest start that fits
            for start in range(len(window)):
                pieces, tail = self.pieces(window[start:])
                if sum(map(len, pieces)) + tail <= budget:
                    return [i for p in pieces for i in p] + [self.sep] * tail
            return []
        pieces, tail = self.pieces(window)  # tokens: keep the last ones
        keep = budget - tail
        if keep <= 0:
            return []
        out = []
        for piece in reversed(pieces):
            room = keep - len(out)
            if room == 0:
                break
            if len(piece) >= room:
                return list(piece[len(piece) - room:]) + out + [self.sep] * tail
            out = list(piece) + out
        return out + [self.sep] * tail


class Conversation:
    def __init__(self):
        self.window = []
        self.speakers = {}
        self.turns = 0
        self.used = 0.0


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "bundle.json"), encoding="utf-8") as f:
            meta = json.load(f)
        params = json.loads(args["model_config"]).get("parameters", {}) if args and "model_config" in args else {}

        def param(key, default):
            value = (params.get(key) or {}).get("string_value", "")
            return value if value != "" else default

        tokenizer = Tokenizer.from_file(os.path.join(here, meta["tokenizer"]))
        tokenizer.no_padding()  # a tokenizer.json saved with padding/truncation on would pad every segment
        tokenizer.no_truncation()
        self.builder = Builder(tokenizer, meta["context"], meta["special_ids"])
        self.pad_to_max_len = str(param("PAD_TO_MAX_LEN", "true")).lower() == "true"
        self.max_conversations = int(param("MAX_CONVERSATIONS", 1000))
        self.idle_ttl_s = float(param("IDLE_TTL_S", 3600)) or None
        self.max_text_chars = int(param("MAX_TEXT_CHARS", 2000))
        self.max_name_chars = int(param("MAX_NAME_CHARS", 200))
        self.conversations = OrderedDict()
        self.clock = time.monotonic

    def push(self, conversation, speaker, text):
        """(ids, mask index, turn index) of the next turn of ``conversation``; state changes only on success."""
        b = self.builder
        now = self.clock()
        if self.idle_ttl_s is not None:
            while self.conversations:
                oldest = next(iter(self.conversations))
                if now - self.conversations[oldest].used <= self.idle_ttl_s:
                    break
                del self.conversations[oldest]
        state = self.conversations.get(conversation) or Conversation()
        label = speaker
        if b.index_speakers:
            label = f"<s{state.speakers.get(speaker, len(state.speakers) + 1)}>"
        window = state.window + [b.encode(label, text)]
        if b.k is not None:
            window = window[-(b.k + 1):]
        ids, mask_index = b.assemble(window)
        state.window, state.used, turn = window, now, state.turns
        state.turns += 1
        state.speakers.setdefault(speaker, len(state.speakers) + 1)
        self.conversations[conversation] = state
        self.conversations.move_to_end(conversation)
        while len(self.conversations) > self.max_conversations:
            self.conversations.popitem(last=False)
        return ids, mask_index, turn

    def strings(self, request, name, limit):
        values = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
        out = []
        for value in values:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            if len(text) > limit:
                raise ValueError(f"{name}: {len(text)} characters, over the limit of {limit}")
            out.append(text)
        return out

    def one(self, request):
        rows = list(zip(self.strings(request, "CONVERSATION", self.max_name_chars),
                        self.strings(request, "SPEAKER", self.max_name_chars),
                        self.strings(request, "TEXT", self.max_text_chars)))
        built = [self.push(*row) for row in rows]
        width = self.builder.max_len if self.pad_to_max_len else max(len(ids) for ids, _, _ in built)
        ids = np.full((len(built), width), self.builder.pad, dtype=np.int64)
        mask = np.zeros((len(built), width), dtype=np.int64)
        for i, (row, _, _) in enumerate(built):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        index = np.array([[m] for _, m, _ in built], dtype=np.int64)
        turn = np.array([[t] for _, _, t in built], dtype=np.int64)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask),
            pb_utils.Tensor("mask_index", index), pb_utils.Tensor("TURN", turn)])

    def execute(self, requests):
        responses = []
        for request in requests:  # in arrival order: a conversation's turns stay in sequence
            try:
                responses.append(self.one(request))
            except (ValueError, UnicodeError) as err:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"bad turn: {err}")))
        return responses
'''
