"""The run folder: one JSON file per finished run, a manifest, and the rebuilt summaries.

Layout of ``--out DIR``::

    DIR/manifest.json      the latest plan per task (its run keys) and every command run here
    DIR/runs/<key>.json    one finished run, self-describing (spec, experiment, metrics, curves)
    DIR/failed/<key>.json  a run whose latest attempt failed: its spec and the reason (removed
                           when it finishes)
    DIR/results.json       every valid run in runs/
    DIR/summary.csv        mean/std per experiment, optimizer, trial and metric
    DIR/report.md          the claims and the evidence;  DIR/plots/*.png  the figures

A run whose file exists and is valid is never redone, so an interrupted ``adabelief run``
resumes where it stopped.  Files are written atomically (temporary file, fsync, rename) with
the permissions the umask allows, and the manifest's read-modify-write holds an exclusive lock,
so several processes may share one folder.  Each run being trained is locked
(:class:`RunLocks`), so two commands on one folder never train the same run twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adabelief.experiments.spec import Experiment, RunSpec

__all__ = [
    "MANIFEST_VERSION",
    "BadRunFile",
    "OutputError",
    "RunLocks",
    "RunStore",
    "atomic_write_text",
    "current_umask",
    "json_safe",
    "validate_record",
]

MANIFEST_VERSION = 2
_UMASK_LOCK = threading.Lock()


class OutputError(OSError):
    """The output folder cannot be used (it is a file, or cannot be created or written)."""


@dataclass(frozen=True)
class BadRunFile:
    """A file in ``runs/`` that is not a valid run record, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities by ``None`` (recursively) so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible, so that nothing changes it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, flush it to disk, then rename.

    The file gets mode ``0o666 & ~umask``, as ``open()`` would give it (``mkstemp`` alone would
    leave it at ``0o600``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def validate_record(data: Any, key: str) -> str | None:
    """Why ``data`` is not a valid run record called ``key`` (``None`` if it is)."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if data.get("key") != key:
        return f"its key {data.get('key')!r} does not match the file name"
    try:
        RunSpec.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        return f"not a run specification ({type(exc).__name__}: {exc})"
    try:
        Experiment.from_json(data["definition"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"no valid experiment definition ({type(exc).__name__}: {exc})"
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not all(_is_number(v) for v in metrics.values()):
        return f'"metrics" must map names to numbers, found {json.dumps(metrics)[:60]}'
    curves = data.get("curves", {})
    if not isinstance(curves, dict) or not all(
        isinstance(v, list) and all(_is_number(x) for x in v) for v in curves.values()
    ):
        return '"curves" must map names to lists of numbers'
    if not isinstance(data.get("diverged", False), bool):
        return '"diverged" must be true or false'
    if not isinstance(data.get("artifacts", {}), dict):
        return '"artifacts" must be an object'
    return None


class RunLocks:
    """One exclusive lock per run being trained, shared by every process using the folder.

    Each run locks one byte (chosen by its key) of ``DIR/runs/.locks`` with a POSIX record lock:
    one open file for any number of runs, released by the system when the process ends however
    it ends, and honoured across machines where the file system supports ``fcntl`` locks (NFS
    does).  Without ``fcntl`` (Windows) every lock is granted.
    """

    def __init__(self, runs_dir: Path) -> None:
        self.path = runs_dir / ".locks"
        self._handle: Any = None

    @staticmethod
    def _offset(key: str) -> int:
        return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)

    def _lock(self, key: str, blocking: bool) -> bool:
        try:
            import fcntl
        except ImportError:
            return True
        if self._handle is None:
            self._handle = self.path.open("a")
        mode = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.lockf(self._handle.fileno(), mode, 1, self._offset(key))
        except OSError:
            if blocking:
                raise
            return False
        return True

    def try_acquire(self, key: str) -> bool:
        """Lock ``key`` unless another process holds it (then ``False``)."""
        return self._lock(key, blocking=False)

    def acquire(self, key: str) -> None:
        """Lock ``key``, waiting for the process that holds it (Ctrl-C interrupts the wait)."""
        self._lock(key, blocking=True)

    def release(self, key: str) -> None:
        """Unlock ``key``."""
        if self._handle is None:
            return
        import fcntl

        fcntl.lockf(self._handle.fileno(), fcntl.LOCK_UN, 1, self._offset(key))

    def close(self) -> None:
        """Release every lock."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.failed_dir = self.root / "failed"
        self.manifest_path = self.root / "manifest.json"

    def check(self) -> None:
        """Check, creating nothing, that the folder can be made and written (raises OutputError).

        Run before anything can fail to start, so that a command that cannot start leaves no
        folder behind; :meth:`prepare` then creates it.
        """
        for folder in (self.root, self.runs_dir):
            if folder.exists() and not folder.is_dir():
                raise OutputError(f"{folder} is a file, not a folder")
        existing = self.root
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{self.root} cannot be created ({existing} is a file)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"{self.root} cannot be written (Permission denied)")

    def prepare(self) -> None:
        """Create the folder and check that files can be written in it (raises OutputError)."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{self.root} is a file, not a folder")
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.root, self.runs_dir):
                with tempfile.TemporaryFile(dir=folder):
                    pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputError(f"{self.root} cannot be written ({reason})") from None

    def run_path(self, key: str) -> Path:
        """File of the run called ``key``."""
        return self.runs_dir / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | BadRunFile | None:
        """The stored record of ``key``; ``None`` if absent, :class:`BadRunFile` if invalid."""
        path = self.run_path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            return BadRunFile(path, f"unreadable ({exc})")
        try:
            data = json.loads(text)
        except ValueError as exc:
            return BadRunFile(path, f"not valid JSON, maybe truncated ({exc})")
        problem = validate_record(data, key)
        return data if problem is None else BadRunFile(path, problem)

    def load(self, key: str) -> dict[str, Any] | None:
        """The valid record of ``key``, or ``None`` (absent or invalid)."""
        record = self.read(key)
        return record if isinstance(record, dict) else None

    def has(self, key: str) -> bool:
        """Whether ``key`` finished (its file exists and is a valid record)."""
        return self.load(key) is not None

    def scan(self) -> tuple[list[dict[str, Any]], list[BadRunFile]]:
        """Every valid record in ``runs/`` (sorted by key) and every invalid file."""
        records: list[dict[str, Any]] = []
        bad: list[BadRunFile] = []
        if not self.runs_dir.is_dir():
            return records, bad
        for path in sorted(self.runs_dir.glob("*.json")):
            record = self.read(path.stem)
            if isinstance(record, BadRunFile):
                bad.append(record)
            elif record is not None:
                records.append(record)
        return records, bad

    def save(self, record: dict[str, Any]) -> Path:
        """Store a finished run atomically; returns its path."""
        path = self.run_path(str(record["key"]))
        atomic_write_text(path, json.dumps(json_safe(record), indent=1, sort_keys=True))
        return path

    def save_failure(self, failure: dict[str, Any]) -> Path:
        """Store why a run failed (``failure["key"]`` names it), replacing an older failure."""
        path = self.failed_dir / f"{failure['key']}.json"
        atomic_write_text(path, json.dumps(json_safe(failure), indent=1, sort_keys=True))
        return path

    def clear_failure(self, key: str) -> None:
        """Forget the failure of ``key`` (it finished)."""
        (self.failed_dir / f"{key}.json").unlink(missing_ok=True)

    def failures(self) -> list[dict[str, Any]]:
        """The stored failures of runs that have not finished since, sorted by key."""
        found: list[dict[str, Any]] = []
        if not self.failed_dir.is_dir():
            return found
        for path in sorted(self.failed_dir.glob("*.json")):
            try:
                failure = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(failure, dict) and not self.has(path.stem):
                found.append(failure)
        return found

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive advisory lock on ``DIR/.<name>.lock`` held for the ``with`` block."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".{name}.lock"
        with path.open("a") as handle:
            try:
                import fcntl
            except ImportError:  # no advisory locks on this platform
                yield
                return
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read_manifest(self) -> dict[str, Any]:
        """The manifest (an empty one if the folder has none or it is unreadable)."""
        empty: dict[str, Any] = {"version": MANIFEST_VERSION, "tasks": {}, "commands": []}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return empty
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            return empty
        if not isinstance(data.get("commands"), list):
            data["commands"] = []
        return data

    def update_manifest(
        self, tasks: dict[str, dict[str, Any]], command: dict[str, Any] | None = None
    ) -> None:
        """Replace the entries of the given tasks and log ``command``, under the folder's lock.

        Other tasks' entries stay, also when another process updates the manifest at once.
        """
        with self.lock("manifest"):
            manifest = self.read_manifest()
            manifest["version"] = MANIFEST_VERSION
            manifest["tasks"].update(tasks)
            if command is not None:
                manifest["commands"].append(command)
            atomic_write_text(self.manifest_path, json.dumps(json_safe(manifest), indent=1))

    def finish_command(self, command_id: str, outcome: dict[str, Any]) -> None:
        """Add ``outcome`` (status, counts, failed runs) to the logged command ``command_id``."""
        with self.lock("manifest"):
            manifest = self.read_manifest()
            for entry in manifest["commands"]:
                if isinstance(entry, dict) and entry.get("id") == command_id:
                    entry.update(outcome)
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
