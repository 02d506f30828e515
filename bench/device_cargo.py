"""Carry the pretrained text encoders to a machine without internet, in pieces small enough for one call each.

    python bench/device_cargo.py pack --out .cargo                      # here: presets -> .cargo/p1..pN
    python bench/device_cargo.py unpack --pieces .cargo/p* --hf-home /tmp/hf   # there: -> HF hub cache

``pack`` resolves each preset (``mpnet-base``, ``minilm-l6``: :func:`erc_distill.pretrained.resolve_pretrained`),
stores its weights as fp16 safetensors (tensors whose values do not fit fp16 stay as they are) with the
files ``from_pretrained`` needs for the model and its tokenizer (config, tokenizer files, the small
sentence-transformers configs; no README, ONNX / OpenVINO copies or ``pytorch_model.bin`` duplicates),
and writes one uncompressed tar per model, laid out as a Hugging Face hub cache entry::

    models--ORG--NAME/refs/main                       (the revision, no newline)
    models--ORG--NAME/snapshots/<revision>/config.json, model.safetensors, tokenizer.json, ...

Each tar is split evenly into the fewest pieces of at most ``--piece-mib`` MiB, one piece per folder (``OUT/p1/cargo.part``,
``OUT/p2/cargo.part``, ...; a model's pieces never hold another model's bytes, so the last model, MiniLM
by default, can travel and be used alone). Every piece folder holds the same ``manifest.json``: piece
sizes and sha256s, and per model the whole tar's size and sha256.

The config keeps ``"torch_dtype": "float32"``: ``from_pretrained`` (whose default dtype is ``"auto"`` in
transformers 5) builds the model in fp32 and upcasts the fp16 tensors, as the original fp32 checkpoint did.

``unpack`` checks every piece's size and sha256 (a corrupted or truncated piece stops it, naming the
piece), joins the pieces of each model whose pieces are all there, checks the whole tar's sha256,
extracts it into ``HF_HOME/hub`` (through a temporary folder: nothing half-written is left) and prints the
``export HF_HOME=... HF_HUB_OFFLINE=1`` line; with it, ``resolve_pretrained("mpnet-base")`` finds the
model in the Hugging Face cache (source ``hf-cache``). Models whose pieces are missing are named and
skipped (``--require`` makes them an error). Unpack needs only the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

FORMAT = "erc-distill-device-cargo/1"
PIECE_FILE = "cargo.part"
MANIFEST_FILE = "manifest.json"
MIB = 1 << 20
DEFAULT_MODELS = ("mpnet-base", "minilm-l6")  # the last one travels alone in the last piece(s)
FP16_MAX = 65504.0
_MTIME = 1_700_000_000  # fixed tar metadata: packing twice gives the same bytes

# What from_pretrained (model + tokenizer) reads, plus the small sentence-transformers configs.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "generation_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
)


class CargoError(RuntimeError):
    """A piece is missing, corrupted or does not belong to the manifest; the archive is inconsistent."""


@dataclass(frozen=True)
class CargoSource:
    """One model to pack: ``name`` (a label, usually the preset), the ``folder`` it loads from, and the
    ``hub_id`` whose cache entry it becomes (``models--ORG--NAME``)."""

    name: str
    folder: Path
    hub_id: str


def repo_folder(hub_id: str) -> str:
    """``huggingface_hub.file_download.repo_folder_name`` for a model repo."""
    return "models--" + hub_id.replace("/", "--")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- pack -------------------------------------------------------------------------------------------
def _load_state_dict(folder: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    if (folder / WEIGHTS_FILE).is_file():
        return load_file(folder / WEIGHTS_FILE)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CargoError(f"{folder} holds no model.safetensors (nor a sharded index, nor pytorch_model.bin)")


def fp16_weights(folder: Path) -> tuple[bytes, dict[str, Any]]:
    """The folder's weights as fp16 safetensors bytes, and what was done (original dtype, tensors kept)."""
    import torch
    from safetensors.torch import save

    state = _load_state_dict(folder)
    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    dtypes: set[str] = set()
    for key, tensor in state.items():
        if tensor.is_floating_point():
            dtypes.add(str(tensor.dtype).replace("torch.", ""))
            finite = bool(torch.isfinite(tensor).all())
            if tensor.numel() and finite and float(tensor.abs().max()) <= FP16_MAX:
                tensor = tensor.to(torch.float16)
            else:
                kept.append(key)
        out[key] = tensor.detach().clone().contiguous()
    n_fp16 = sum(1 for t in out.values() if t.dtype == torch.float16)
    return save(out, metadata={"format": "pt"}), {"source_dtypes": sorted(dtypes), "fp16_tensors": n_fp16,
                                                   "kept_tensors": kept, "tensors": len(out)}


def model_files(folder: Path) -> dict[str, bytes]:
    """The files to carry for one model folder: path inside the snapshot -> bytes."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CargoError(f"{folder} has no {CONFIG_FILE}")
    config = json.loads((folder / CONFIG_FILE).read_text("utf-8"))
    weights, info = fp16_weights(folder)
    source = info["source_dtypes"]
    # the dtype from_pretrained builds the model in ("auto" reads it first): the original one, not fp16
    config["torch_dtype"] = config.get("torch_dtype") or config.get("dtype") or (source[0] if len(source) == 1 else "float32")
    config.pop("dtype", None)
    files = {CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"), WEIGHTS_FILE: weights}
    for name in EXTRA_FILES:
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    files[".cargo-info.json"] = json.dumps(info, indent=2).encode("utf-8")
    return files


def _revision(hub_id: str, files: dict[str, bytes]) -> str:
    """A 40-hex revision (the form ``snapshot_download`` expects in ``refs/main``) fixed by the content."""
    digest = hashlib.sha1(hub_id.encode("utf-8"))
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


class _HashingWriter:
    """A write-only stream into ``file`` that also counts and hashes what passes."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.hash, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def split_evenly(archive: Path, out: Path, first_index: int, piece_bytes: int) -> list[dict[str, Any]]:
    """Cut ``archive`` into the fewest pieces of at most ``piece_bytes``, of (nearly) equal sizes, written as
    ``out/pN/cargo.part`` from ``N = first_index``; returns each piece's name, size and sha256."""
    size = archive.stat().st_size
    count = max(1, -(-size // piece_bytes))
    each = -(-size // count)
    pieces = []
    with open(archive, "rb") as src:
        for i in range(count):
            name = f"p{first_index + i}"
            (out / name).mkdir(parents=True, exist_ok=True)
            digest, left, written = hashlib.sha256(), min(each, size - i * each), 0
            with open(out / name / PIECE_FILE, "wb") as dst:
                while left:
                    block = src.read(min(left, 1 << 22))
                    dst.write(block)
                    digest.update(block)
                    left -= len(block)
                    written += len(block)
            pieces.append({"name": name, "size": written, "sha256": digest.hexdigest()})
    return pieces


def _tar_info(name: str, size: int, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = _MTIME, 0, 0, "", ""
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info


def _clear_out(out: Path) -> None:
    """Remove the pieces of an earlier pack in ``out`` (only ``pN/cargo.part`` and ``pN/manifest.json``)."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.is_dir() and child.name[:1] == "p" and child.name[1:].isdigit():
            for name in (PIECE_FILE, MANIFEST_FILE):
                (child / name).unlink(missing_ok=True)
            try:
                child.rmdir()
            except OSError:
                raise CargoError(f"{child} holds other files than a cargo piece: not touching it") from None


def pack(out: str | Path, sources: list[CargoSource], piece_bytes: int, log: Any = print) -> dict[str, Any]:
    """Pack ``sources`` (in order, each its own tar and its own pieces) into ``out/p1``, ``out/p2``, ...;
    returns the manifest, also written to every piece folder."""
    out = Path(out)
    if piece_bytes < 10240:
        raise ValueError("pieces must hold at least 10 KiB")
    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    archives, pieces = [], []
    for source in sources:
        files = model_files(source.folder)
        revision = _revision(source.hub_id, files)
        top = repo_folder(source.hub_id)
        tar_path = out / f".{source.name}.tar.tmp"
        with open(tar_path, "wb") as tar_file:
            writer = _HashingWriter(tar_file)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                dirs = [top, f"{top}/refs", f"{top}/snapshots", f"{top}/snapshots/{revision}"]
                dirs += sorted({f"{top}/snapshots/{revision}/{Path(n).parent}" for n in files if "/" in n})
                for d in dirs:
                    tar.addfile(_tar_info(d, 0, directory=True))
                ref = revision.encode("ascii")  # no newline: snapshot_download reads the file as it is
                tar.addfile(_tar_info(f"{top}/refs/main", len(ref)), io.BytesIO(ref))
                for name in sorted(files, key=lambda n: (n == WEIGHTS_FILE, n)):  # small files first
                    data = files[name]
                    tar.addfile(_tar_info(f"{top}/snapshots/{revision}/{name}", len(data)), io.BytesIO(data))
        try:
            these = split_evenly(tar_path, out, len(pieces) + 1, piece_bytes)
        finally:
            tar_path.unlink(missing_ok=True)
        for piece in these:
            piece.update(archive=source.name, file=f"{piece['name']}/{PIECE_FILE}")
        pieces += these
        info = json.loads(files[".cargo-info.json"])
        archives.append({
            "name": source.name, "hub_id": source.hub_id, "repo_folder": top, "revision": revision,
            "size": writer.size, "sha256": writer.hash.hexdigest(), "pieces": [p["name"] for p in these],
            "files": {n: len(d) for n, d in sorted(files.items())}, **info,
        })
        log(f"{source.name}: {source.hub_id} from {source.folder}: {info['fp16_tensors']}/{info['tensors']} tensors "
            f"fp16 (was {','.join(info['source_dtypes'])}; kept as they were: {len(info['kept_tensors'])}), "
            f"tar {writer.size / MIB:.2f} MiB -> {', '.join(p['name'] for p in these)}")
    manifest = {"format": FORMAT, "piece_bytes": piece_bytes, "piece_count": len(pieces), "pieces": pieces,
                "archives": archives}
    text = json.dumps(manifest, indent=2) + "\n"
    for piece in pieces:
        (out / piece["name"] / MANIFEST_FILE).write_text(text)
    for piece in pieces:
        log(f"  {piece['file']}: {piece['size']} bytes ({piece['size'] / MIB:.2f} MiB) [{piece['archive']}] "
            f"sha256 {piece['sha256'][:16]}...")
    return manifest


def preset_sources(names: list[str]) -> list[CargoSource]:
    """The resolved folder and hub id of each encoder preset (``presets/encoders.yaml``)."""
    from erc_distill.pretrained import encoder_presets, resolve_pretrained

    presets = encoder_presets()
    sources = []
    for name in names:
        if name not in presets:
            raise CargoError(f"{name!r} is not an encoder preset ({', '.join(presets)})")
        resolved = resolve_pretrained(name)
        if not Path(resolved.location).is_dir():
            raise CargoError(f"{name}: resolved to {resolved.location!r} ({resolved.source}), not a local folder")
        sources.append(CargoSource(name, Path(resolved.location), presets[name].hub_id))
    return sources


# -- unpack -----------------------------------------------------------------------------------------
class _ChainReader:
    """Reads files one after the other as one stream, hashing what passes."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._file: BinaryIO | None = None
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._file is None:
                if not self._paths:
                    break
                self._file = open(self._paths.pop(0), "rb")
            block = self._file.read(-1 if n < 0 else n - len(out))
            if not block:
                self._file.close()
                self._file = None
                continue
            out += block
        self.hash.update(out)
        self.size += len(out)
        return bytes(out)

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


def _read_manifests(piece_dirs: list[Path]) -> dict[str, Any]:
    manifest = None
    for d in piece_dirs:
        path = d / MANIFEST_FILE
        if not path.is_file():
            continue
        this = json.loads(path.read_text())
        if this.get("format") != FORMAT:
            raise CargoError(f"{path}: not a cargo manifest ({this.get('format')!r})")
        if manifest is not None and this != manifest:
            raise CargoError(f"{path} differs from the other pieces' manifest: pieces of different packs mixed")
        manifest = this
    if manifest is None:
        raise CargoError(f"no {MANIFEST_FILE} in any of {', '.join(map(str, piece_dirs))}")
    return manifest


def verify_pieces(piece_dirs: list[str | Path], log: Any = print) -> tuple[dict[str, Any], dict[str, Path]]:
    """Check each piece's size and sha256 against the manifest; returns the manifest and piece name -> file."""
    dirs = [Path(d) for d in piece_dirs]
    manifest = _read_manifests(dirs)
    by_name = {p["name"]: p for p in manifest["pieces"]}
    found: dict[str, Path] = {}
    for d in dirs:
        file = d / PIECE_FILE
        if not file.is_file():
            raise CargoError(f"{d}: no {PIECE_FILE}")
        size, digest = file.stat().st_size, _sha256_file(file)
        piece = by_name.get(d.name)
        if piece is None:  # a renamed folder: find it by content
            piece = next((p for p in manifest["pieces"] if p["sha256"] == digest), None)
            if piece is None:
                raise CargoError(f"{file}: matches no piece of the manifest (sha256 {digest}); corrupted?")
        if size != piece["size"]:
            raise CargoError(f"{file} (piece {piece['name']}): {size} bytes, the manifest says {piece['size']}: "
                             "truncated or corrupted copy, carry it again")
        if digest != piece["sha256"]:
            raise CargoError(f"{file} (piece {piece['name']}): sha256 {digest}, the manifest says {piece['sha256']}: "
                             "corrupted copy, carry it again")
        if piece["name"] in found and found[piece["name"]] != file:
            log(f"piece {piece['name']} given twice ({found[piece['name']]}, {file}); using the first")
            continue
        found[piece["name"]] = file
        log(f"ok {piece['name']} ({piece['archive']}): {size} bytes, sha256 {digest[:16]}...")
    return manifest, found


def _check_member(member: tarfile.TarInfo, top: str) -> None:
    parts = Path(member.name).parts
    if not parts or parts[0] != top or ".." in parts or Path(member.name).is_absolute():
        raise CargoError(f"unexpected path in the archive: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise CargoError(f"unexpected entry type in the archive: {member.name!r}")


def _extract_archive(archive: dict[str, Any], files: list[Path], hub_cache: Path) -> Path:
    top, revision = archive["repo_folder"], archive["revision"]
    hub_cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hub_cache, prefix=".cargo-") as tmp:
        reader = _ChainReader(files)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                _check_member(member, top)
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, tmp, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: the paths were checked above
                    tar.extract(member, tmp)
        reader.drain()
        if reader.size != archive["size"] or reader.hash.hexdigest() != archive["sha256"]:
            raise CargoError(f"{archive['name']}: the joined pieces give sha256 {reader.hash.hexdigest()} "
                             f"({reader.size} bytes), the manifest says {archive['sha256']} ({archive['size']} bytes)")
        unpacked = Path(tmp) / top
        snapshot = unpacked / "snapshots" / revision
        for name, size in archive["files"].items():
            if not (snapshot / name).is_file() or (snapshot / name).stat().st_size != size:
                raise CargoError(f"{archive['name']}: {name} missing or of the wrong size after extraction")
        target = hub_cache / top
        (target / "snapshots").mkdir(parents=True, exist_ok=True)
        (target / "refs").mkdir(parents=True, exist_ok=True)
        final = target / "snapshots" / revision
        if final.exists():  # an earlier unpack of the same content: replace it whole
            old = Path(tmp) / "old"
            os.replace(final, old)
        os.replace(snapshot, final)
        ref_tmp = Path(tmp) / "main"
        ref_tmp.write_bytes(revision.encode("ascii"))
        os.replace(ref_tmp, target / "refs" / "main")
    return final


def unpack(piece_dirs: list[str | Path], hf_home: str | Path, require: list[str] | None = None,
           log: Any = print) -> dict[str, Path]:
    """Verify the pieces, then extract every model whose pieces are all given into ``hf_home/hub``;
    returns model name -> snapshot folder. Raises :class:`CargoError` on a bad piece, or when a model
    in ``require`` (``["*"]``: all of them) lacks pieces, or when no model is complete."""
    manifest, found = verify_pieces(piece_dirs, log)
    hub_cache = Path(hf_home).expanduser().resolve() / "hub"
    complete = [a for a in manifest["archives"] if all(p in found for p in a["pieces"])]
    missing = {a["name"]: [p for p in a["pieces"] if p not in found] for a in manifest["archives"] if a not in complete}
    wanted = [a["name"] for a in manifest["archives"]] if require == ["*"] else (require or [])
    lacking = [n for n in wanted if n in missing or n not in {a["name"] for a in manifest["archives"]}]
    if lacking:
        raise CargoError("required models lack pieces: " + "; ".join(
            f"{n}: needs {', '.join(missing.get(n, ['(not in this pack)']))}" for n in lacking))
    if not complete:
        raise CargoError("no model has all its pieces: " + "; ".join(f"{n}: needs {', '.join(p)}" for n, p in missing.items()))
    for name, absent in missing.items():
        log(f"skipping {name}: pieces {', '.join(absent)} not given")
    out = {}
    for archive in complete:
        files = [found[p] for p in archive["pieces"]]
        out[archive["name"]] = _extract_archive(archive, files, hub_cache)
        log(f"{archive['name']}: {archive['hub_id']} -> {out[archive['name']]}")
    _check_with_hub(complete, hub_cache, out, log)
    return out


def _check_with_hub(archives: list[dict[str, Any]], hub_cache: Path, out: dict[str, Path], log: Any) -> None:
    """Ask huggingface_hub (when installed) to find each model offline, as resolve_pretrained will."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return
    for archive in archives:
        try:
            found = Path(snapshot_download(archive["hub_id"], local_files_only=True, cache_dir=str(hub_cache)))
        except Exception as err:  # noqa: BLE001 - reported as a failed check
            raise CargoError(f"{archive['hub_id']}: huggingface_hub cannot find the unpacked snapshot: {err}") from err
        if found.resolve() != out[archive["name"]].resolve():
            raise CargoError(f"{archive['hub_id']}: huggingface_hub finds {found}, not {out[archive['name']]}")
        log(f"  huggingface_hub finds {archive['hub_id']} offline: {found}")


def export_line(hf_home: str | Path) -> str:
    home = Path(hf_home).expanduser().resolve()
    return (f"export HF_HOME={shlex.quote(str(home))} HF_HUB_CACHE={shlex.quote(str(home / 'hub'))} "
            "HF_HUB_OFFLINE=1")


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="presets -> fp16 tar pieces OUT/p1/cargo.part, OUT/p2/cargo.part, ...")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--piece-mib", type=float, default=58.0, help="largest piece, MiB (default 58)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="encoder presets, in piece order (default: mpnet-base minilm-l6)")
    u = sub.add_parser("unpack", help="pieces -> Hugging Face hub cache under --hf-home")
    u.add_argument("--pieces", nargs="+", required=True, type=Path, help="piece folders (each with cargo.part)")
    u.add_argument("--hf-home", required=True, type=Path)
    u.add_argument("--require", nargs="+", default=None,
                   help="models that must be complete (names, or '*' for all); by default incomplete ones are skipped")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            manifest = pack(args.out, preset_sources(args.models), int(args.piece_mib * MIB))
            print(f"{manifest['piece_count']} pieces of at most {args.piece_mib:g} MiB in {args.out}: "
                  + ", ".join(f"{p['name']} {p['size'] / MIB:.2f} MiB ({p['archive']})" for p in manifest["pieces"]))
        else:
            unpack(args.pieces, args.hf_home, args.require)
            print(export_line(args.hf_home))
    except CargoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
