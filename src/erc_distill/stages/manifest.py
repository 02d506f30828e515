"""``runs/NAME/manifest.json``: the run's config, versions, machine, and per stage its record.

A stage record: ``{"key", "status": running|done|failed, "wall_s", "artifacts": {name: path},
"hashes": {name: sha256}, ...stage info}``. A done stage is trusted on a rerun only if its key is
unchanged and every artifact is present with the hash recorded when it was made. Paths under the
run and cache folders are mapped when those folders move (a run copied to another machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from erc_distill.atomic import sha256_tree, write_json


def _check_shape(data: object) -> None:
    """ValueError unless ``data`` has the manifest's shape (a hand edit may break it)."""
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise ValueError("not a mapping with a 'stages' mapping")
    for name, record in data.get("stages", {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("artifacts", {}), dict) \
                or not all(isinstance(p, str) for p in record.get("artifacts", {}).values()):
            raise ValueError(f"stage {name!r} is not a record with an artifacts mapping")


class Manifest:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"stages": {}}
        self.note = ""
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
                _check_shape(self.data)
            except (ValueError, UnicodeDecodeError) as err:  # written atomically: only a hand edit does this
                broken = self.path.with_name("manifest.broken.json")
                self.path.replace(broken)
                self.note = f"{self.path} was unreadable ({err}); kept as {broken.name}, stages run again"
                self.data = {"stages": {}, "note": self.note}
        self.data.setdefault("stages", {})

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def record(self, stage: str) -> dict[str, Any]:
        """The stage's record; a ConfigError naming the stage when it has not run."""
        from erc_distill.errors import ConfigError

        if stage not in self.stages:
            raise ConfigError(f"stage {stage!r} has not run in {self.path.parent} (run it, or drop --start-at)")
        return self.stages[stage]

    def artifact(self, stage: str, name: str) -> Path:
        return Path(self.record(stage)["artifacts"][name])

    def save(self) -> None:
        write_json(self.path, self.data)

    def relocate(self, now: dict[str, Path]) -> None:
        """Map artifact paths recorded under the old run / cache folders to where they are now."""
        before = self.data.get("paths", {})
        moves = [(before.get(k), str(p.resolve())) for k, p in now.items()]
        moves = [(old, new) for old, new in moves if old and old != new]
        for record in self.stages.values():
            for name, path in record.get("artifacts", {}).items():
                for old, new in moves:
                    if path == old or path.startswith(old.rstrip("/") + "/"):
                        record["artifacts"][name] = new + path[len(old.rstrip("/")):]
                        break
        self.data["paths"] = {k: str(p.resolve()) for k, p in now.items()}

    def verify(self, stage: str, key: str) -> str | None:
        """Why a done stage cannot be skipped (None: it can): key, status, a missing or changed artifact."""
        record = self.stages.get(stage)
        if not record:
            return "not run yet"
        if record.get("key") != key:
            return "its inputs changed"
        if record.get("status") != "done":
            return f"last attempt {record.get('status')}"
        hashes = record.get("hashes", {})
        for name, path in record.get("artifacts", {}).items():
            if not Path(path).exists():
                return f"artifact {name} is missing ({path})"
            if name in hashes and sha256_tree(path) != hashes[name]:
                return f"artifact {name} changed since it was made ({path})"
        return None
