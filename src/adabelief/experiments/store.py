"""The run folder: one JSON file per finished run, a manifest, and the rebuilt summaries.

Layout of ``--out DIR``::

    DIR/manifest.json      what was asked for, per task (mode, experiments, the run keys)
    DIR/runs/<key>.json    one finished run (written atomically when the run ends)
    DIR/results.json       all runs of the manifest, rebuilt from runs/
    DIR/summary.csv        mean/std per experiment, optimizer, learning rate and metric
    DIR/report.md          the claims and the evidence;  DIR/plots/*.png  the figures

A run whose file exists is never redone, so an interrupted ``adabelief run`` resumes where it
stopped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_VERSION", "RunStore", "atomic_write_text", "json_safe"]

MANIFEST_VERSION = 1


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities by ``None`` (recursively) so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, flush it to disk, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.manifest_path = self.root / "manifest.json"

    def run_path(self, key: str) -> Path:
        """File of the run called ``key``."""
        return self.runs_dir / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored record of ``key``, or ``None`` if absent or unreadable."""
        path = self.run_path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def has(self, key: str) -> bool:
        """Whether ``key`` finished (its file exists and parses)."""
        return self.load(key) is not None

    def save(self, record: dict[str, Any]) -> Path:
        """Store a finished run atomically; returns its path."""
        path = self.run_path(str(record["key"]))
        atomic_write_text(path, json.dumps(json_safe(record), indent=1, sort_keys=True))
        return path

    def read_manifest(self) -> dict[str, Any]:
        """The manifest (an empty one if the folder has none)."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"version": MANIFEST_VERSION, "tasks": {}}
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            return {"version": MANIFEST_VERSION, "tasks": {}}
        return data

    def update_manifest(self, tasks: dict[str, dict[str, Any]]) -> None:
        """Replace the entries of the given tasks (other tasks' entries stay)."""
        manifest = self.read_manifest()
        manifest["version"] = MANIFEST_VERSION
        manifest["tasks"].update(tasks)
        atomic_write_text(self.manifest_path, json.dumps(json_safe(manifest), indent=1))

    def write_json(self, name: str, value: Any) -> Path:
        """Write ``value`` as JSON to ``DIR/name`` atomically."""
        path = self.root / name
        atomic_write_text(path, json.dumps(json_safe(value), indent=1))
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` to ``DIR/name`` atomically."""
        path = self.root / name
        atomic_write_text(path, text)
        return path
