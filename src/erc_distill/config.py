"""Experiment files: a YAML mapping of the run options (the long names of the command line, with
underscores), by shipped name (``erc_distill/configs/*.yaml``) or path.

``erc-distill --config meld-mpnet-minilm --seed 2``: the file sets the defaults, flags typed on the
command line override them. Every run writes its resolved options to ``runs/NAME/config.yaml``, so
``erc-distill --config runs/NAME/config.yaml`` repeats it. The schema is the command line itself
(typed dataclasses behind it); the files are data only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from erc_distill.errors import DataError

#: The pipeline's stages, in order (``erc_distill.pipeline`` runs them; here so the CLI needs no torch).
STAGES = ("teacher", "cache", "distill", "evaluate", "export", "quantize", "profile", "report")


def packaged_names(package: str) -> list[str]:
    """Names of the YAML files shipped in ``package`` (e.g. ``erc_distill.configs``)."""
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def read_yaml_mapping(name_or_path: str | Path, package: str, kind: str) -> tuple[dict[str, Any], str]:
    """A YAML mapping from a path, or by name from the files shipped in ``package``; returns it with its
    source. Missing files, bad YAML and non-mappings are DataErrors naming the file (and line)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise DataError(f"{kind} file not found", file=path)
        text, source = path.read_text("utf-8"), str(path)
    elif str(name_or_path) in packaged_names(package):
        ref = resources.files(package).joinpath(f"{name_or_path}.yaml")
        text, source = ref.read_text("utf-8"), str(ref)
    else:
        raise ValueError(f"unknown {kind} {name_or_path!r}; shipped: {', '.join(packaged_names(package))}, or a YAML path")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(f"not valid YAML: {err}", file=source, line=None if mark is None else mark.line + 1) from None
    if not isinstance(values, dict):
        raise DataError(f"a {kind} file is a mapping of field: value", file=source)
    return values, source


def config_names() -> list[str]:
    return packaged_names("erc_distill.configs")


def load_config_file(name_or_path: str | Path, known: set[str]) -> dict[str, Any]:
    """The options of an experiment file; unknown keys are a DataError naming the file and the key."""
    values, source = read_yaml_mapping(name_or_path, "erc_distill.configs", "config")
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(unknown)}; options are the long command-line names with "
                        "underscores (see erc-distill --help)", file=source, field=unknown[0])
    return values


def dump_config(values: dict[str, Any], path: str | Path) -> None:
    """Write resolved run options as an experiment file."""
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    Path(path).write_text("# erc-distill run options; repeat with: erc-distill --config THIS_FILE\n"
                          + yaml.safe_dump(clean, sort_keys=True))
