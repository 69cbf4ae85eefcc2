"""A user's own task: ``adabelief run path/to/file.py:FUNCTION`` (or ``package.module:FUNCTION``).

The user writes one function and decorates it::

    from adabelief.experiments import user_task

    @user_task(score="test_accuracy", higher_is_better=True, claim="generalization")
    def my_task(make_optimizer, seed, quick):
        ...  # make_optimizer(params) returns this run's optimizer (preset or fair-mode trial)
        return {"test_accuracy": 97.1, "train_loss": [2.3, 1.1, 0.7]}

A function that also takes ``prepare_model`` (``def my_task(make_optimizer, seed, quick,
prepare_model)``) can run the optimizer variants that train a model in another dtype (the
bfloat16 ones, ``adabelief_bf16w_*``): it passes its model through ``prepare_model(model)``
before ``make_optimizer``, which puts the model in the variant's dtype, taking and returning
float32 (:func:`adabelief.experiments.training.model_for_optimizer`; for other optimizers it
returns the model unchanged).  Without that parameter the runner refuses those variants.

The function returns floats (metrics) and lists of floats (curves, one value per evaluation;
an optional ``"x"`` list gives their positions, ``"step"`` the optimizer steps and ``"time_s"``
the seconds, for time-to-target).  The runner seeds Python, NumPy and torch with ``seed``
before calling it.  Seeds, fair mode, statistics, resume and the executor work as for the
built-in tasks, and the run key includes a fingerprint (:func:`source_fingerprint`) of the
source file that defines the function and of every local module it imports, directly or through
another local module (a ``.py`` file or package beside it, or in the same package for a
module-based task; installed packages are not followed), so editing the task or a helper it
imports reruns it.  Only the runs of the latest version enter the report.  A non-finite score
marks the run as diverged.

Workers (local processes or Ray) get the file's source from the driver, so a file-based task
needs no shared filesystem as long as it imports only installed packages; a module-based task
must be importable on every worker.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adabelief.experiments.spec import CLAIMS, Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task

__all__ = [
    "TaskLoadError",
    "UserTask",
    "UserTaskSpec",
    "is_task_reference",
    "load_user_task",
    "local_sources",
    "source_fingerprint",
    "task_from_payload",
    "user_task",
]

_MARK = "__adabelief_task__"
_NAME = re.compile(r"[^A-Za-z0-9_]+")


def _imported_names(source: str, package: list[str]) -> list[list[str]]:
    """Dotted module paths ``source`` imports (relative ones resolved against ``package``)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".") if node.module else []
            if node.level:
                if node.level - 1 > len(package):
                    continue
                base = package[: len(package) - (node.level - 1)] + base
            found.append(base)
            found += [[*base, alias.name] for alias in node.names]  # from pkg import module
    return [name for name in found if name and all(name)]


def _module_file(root: Path, name: list[str]) -> Path | None:
    candidate = root.joinpath(*name)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def local_sources(path: Path, source: str, module: str = "") -> dict[str, str]:
    """The local modules ``source`` (the file ``path``, module ``module`` or ``""``) imports,
    directly or through each other: ``{path relative to the import root: text}``.

    The import root is the file's folder for a file task, or the folder holding the top-level
    package of a module task (which follows only its own package); a name that is no file
    under the root (an installed or standard module) is not followed.
    """
    parts = module.split(".") if module else []
    root = path.parent
    for _ in parts[1:]:
        root = root.parent
    package = parts[:-1]
    if path.name == "__init__.py" and parts:
        package = parts
    found: dict[str, str] = {}
    queue = [(source, package)]
    while queue:
        text, current = queue.pop()
        for name in _imported_names(text, current):
            if parts and name[0] != parts[0]:
                continue  # a module task follows only its own top-level package
            for depth in range(1, len(name) + 1):
                file = _module_file(root, name[:depth])
                if file is None or file.resolve() == path.resolve():
                    continue
                key = file.relative_to(root).as_posix()
                if key in found:
                    continue
                try:
                    found[key] = file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    found[key] = ""
                inner = name[:depth] if file.name == "__init__.py" else name[: depth - 1]
                queue.append((found[key], inner))
    return found


def source_fingerprint(source: str, path: Path | None, module: str = "") -> str:
    """SHA-256 (16 hex digits) of a task's source and of the local modules it imports."""
    digest = hashlib.sha256(source.encode())
    if path is not None:
        for name, text in sorted(local_sources(path, source, module).items()):
            digest.update(f"\0{name}\0".encode())
            digest.update(text.encode())
    return digest.hexdigest()[:16]


class TaskLoadError(ValueError):
    """A task reference that cannot be loaded (the message is one line naming the problem)."""


@dataclass(frozen=True)
class UserTaskSpec:
    """What ``@user_task`` declared."""

    score: str
    higher_is_better: bool = True
    claim: str | None = None
    selection: str | None = None
    target_curve: str | None = None
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)


def user_task(
    *,
    score: str,
    higher_is_better: bool = True,
    claim: str | None = None,
    selection: str | None = None,
    target_curve: str | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark ``fn(make_optimizer, seed, quick) -> dict`` as a task for ``adabelief run``.

    ``score``: the returned metric that is reported and compared (``higher_is_better`` gives its
    direction).  ``claim``: ``"convergence"``, ``"generalization"``, ``"gan"`` or ``None``; with
    a claim the score enters that claim's verdict.  ``selection``: a returned metric measured on
    validation data that picks the fair-mode trial (default: the score itself).
    ``target_curve``: a returned curve (same direction as the score) whose time to target is
    measured.  ``hparams``: per optimizer, values that replace the defaults
    (``adabelief presets`` lists them), e.g. ``{"sgd": {"lr": 0.05}}``.  The function itself is
    returned unchanged.
    """
    if not isinstance(score, str) or not score:
        raise TypeError("user_task(score=...) must name the metric the task returns")
    if claim is not None and claim not in CLAIMS:
        raise ValueError(f"user_task(claim={claim!r}): choose from {', '.join(CLAIMS)} or None")
    spec = UserTaskSpec(
        score, bool(higher_is_better), claim, selection, target_curve, dict(hparams or {})
    )

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _MARK, spec)
        return fn

    return mark


def is_task_reference(text: str) -> bool:
    """Whether ``text`` looks like ``FILE.py:FUNCTION`` or ``module:FUNCTION``."""
    return ":" in text


def _one_line(exc: BaseException, path: Path | None) -> str:
    """``Type: message (line N)`` with the line in the user's file where it happened."""
    # A SyntaxError's str() already ends in "(file, line N)": use its bare message instead.
    raw = str(exc.msg or "") if isinstance(exc, SyntaxError) else str(exc)
    message = raw.strip().splitlines()[0] if raw.strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    if line is None and path is not None:
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if Path(frame.filename).resolve() == path.resolve():
                line = frame.lineno
                break
    return f"{text} (line {line})" if line else text


def _module_from_source(name: str, source: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        code = compile(source, str(path), "exec")
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@functools.lru_cache(maxsize=32)
def _load_file(path_text: str, source: str) -> types.ModuleType:
    path = Path(path_text)
    fingerprint = hashlib.sha256(source.encode()).hexdigest()[:12]
    folder = str(path.parent)
    if path.parent.is_dir() and folder not in sys.path:
        sys.path.insert(0, folder)  # the user's file may import its neighbours
    return _module_from_source(
        f"adabelief_user_{_NAME.sub('_', path.stem)}_{fingerprint}", source, path
    )


def _resolve(
    reference: str, source: str | None = None
) -> tuple[Callable[..., Any], str, str, str | None]:
    """``(function, module name, source text, file path or None)`` of a reference."""
    target, _, function_name = reference.rpartition(":")
    if not target or not function_name:
        raise TaskLoadError(
            f"task {reference!r} must look like FILE.py:FUNCTION or module:FUNCTION"
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target).expanduser()
        if source is None:
            if not path.is_file():
                raise TaskLoadError(f"task {reference!r}: no such file {path}")
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TaskLoadError(f"task {reference!r}: cannot read {path} ({exc})") from None
        try:
            module = _load_file(str(path.resolve()), source)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise TaskLoadError(
                f"task {reference!r}: importing {path} failed: {_one_line(exc, path)}"
            ) from None
        where, file_path = str(path), str(path.resolve())
    else:
        try:
            module = importlib.import_module(target)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise TaskLoadError(
                f"task {reference!r}: cannot import module {target!r}: {_one_line(exc, None)}"
            ) from None
        where, file_path = f"module {target}", None
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            source = ""
    function = getattr(module, function_name, None)
    if function is None:
        raise TaskLoadError(f"task {reference!r}: {where} has no function {function_name!r}")
    if not callable(function) or not isinstance(getattr(function, _MARK, None), UserTaskSpec):
        raise TaskLoadError(
            f"task {reference!r}: {function_name} is not decorated with "
            "@adabelief.experiments.user_task(score=...)"
        )
    return function, module.__name__, source, file_path


def _check_output(value: Any, name: str, spec: UserTaskSpec) -> RunOutput:
    """Turn the function's return value into a :class:`RunOutput` (raises ``ValueError``)."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} returned {type(value).__name__}; it must return a dict")
    metrics: dict[str, float | None] = {}
    curves: dict[str, list[float | None]] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} returned the key {key!r}; keys must be strings")
        if isinstance(item, bool) or item is None:
            raise ValueError(f"{name} returned {key!r} = {item!r}; expected a float or a list")
        if isinstance(item, int | float):
            metrics[key] = float(item) if math.isfinite(item) else None
        elif isinstance(item, list | tuple):
            points: list[float | None] = []
            for v in item:
                if isinstance(v, bool) or not isinstance(v, int | float | None):
                    raise ValueError(
                        f"{name} returned the curve {key!r} with a {type(v).__name__}; "
                        "curves hold floats"
                    )
                points.append(None if v is None or not math.isfinite(v) else float(v))
            curves[key] = points
        else:
            try:
                metrics[key] = float(item)  # numpy and torch scalars
            except (TypeError, ValueError):
                raise ValueError(
                    f"{name} returned {key!r} of type {type(item).__name__}; "
                    "expected a float or a list of floats"
                ) from None
            if not math.isfinite(metrics[key] or 0.0):
                metrics[key] = None
    if spec.score not in value:
        raise ValueError(
            f"{name} returned no {spec.score!r} (its score); it returned {sorted(value)}"
        )
    if spec.score not in metrics:
        raise ValueError(f"{name} returned {spec.score!r} as a curve; the score must be a float")
    return RunOutput(metrics=metrics, curves=curves, diverged=metrics[spec.score] is None)


class UserTask(Task):
    """A task defined by a user's decorated function."""

    summary = "a user's own task"

    def __init__(
        self,
        reference: str,
        function: Callable[..., Any],
        module: str,
        source: str,
        path: str | None,
        name: str | None = None,
    ) -> None:
        self.reference = reference
        self.function = function
        self.module = module
        self.source = source
        self.path = path
        self.spec: UserTaskSpec = getattr(function, _MARK)
        module_file = getattr(sys.modules.get(module), "__file__", None)
        where = Path(path) if path is not None else (Path(module_file) if module_file else None)
        self.fingerprint = source_fingerprint(source, where, "" if path is not None else module)
        self.name = name or _NAME.sub("_", function.__name__)  # type: ignore[misc]

    def payload(self) -> dict[str, Any]:
        """Reference, name and source (for file-based tasks), so workers need no shared files."""
        return {
            "user": {
                "reference": self.reference,
                "name": self.name,
                "source": self.source if self.path is not None else None,
                "fingerprint": self.fingerprint,
            }
        }

    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """One experiment: the function, with its declared score and claim."""
        from adabelief.experiments.presets import USER_PRESET

        spec = self.spec
        score = Metric(spec.score, spec.score, spec.higher_is_better)
        selection = (
            Metric(spec.selection, spec.selection, spec.higher_is_better)
            if spec.selection
            else score
        )
        doc = (inspect.getdoc(self.function) or "").strip().splitlines()
        title = doc[0] if doc else f"user task {self.function.__name__}"
        target = (
            Metric(spec.target_curve, spec.target_curve, spec.higher_is_better)
            if spec.target_curve
            else None
        )
        return [
            Experiment(
                task=self.name,
                name=self.function.__name__,
                title=title,
                preset=USER_PRESET,
                settings={
                    "function": self.function.__qualname__,
                    "source_fingerprint": self.fingerprint,
                    "quick": options.quick,
                },
                score=score,
                selection=selection,
                claims=() if spec.claim is None else (spec.claim,),
                speed=score if spec.claim == "convergence" else None,
                x_label="evaluation",
                target=target,
            )
        ]

    @property
    def takes_prepare_model(self) -> bool:
        """Whether the function has a ``prepare_model`` parameter (see the module docstring)."""
        try:
            return "prepare_model" in inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            return False

    def model_dtype_refusal(self, experiment: Experiment) -> str:
        """A user's function builds its own model: the runner can put it in a variant's dtype
        only through the function's ``prepare_model`` parameter."""
        if self.takes_prepare_model:
            return ""
        return (
            f"{self.function.__name__} builds its own model and passes only its parameters to "
            "make_optimizer; give it a prepare_model parameter and build the optimizer over "
            "prepare_model(model).parameters()"
        )

    def preset_hparams(self, experiment: Experiment, optimizer: str) -> dict[str, Any]:
        """The default hyperparameters of ``optimizer`` with the task's ``hparams`` overrides."""
        return {
            **super().preset_hparams(experiment, optimizer),
            **self.spec.hparams.get(optimizer, {}),
        }

    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Seed everything and call the function with this run's optimizer factory."""
        from adabelief.experiments.registry import create_optimizer
        from adabelief.experiments.training import model_for_optimizer, seed_everything

        def make_optimizer(params: Iterable[Any]) -> Any:
            return create_optimizer(spec.optimizer, params, **spec.hparams)

        seed_everything(spec.seed)
        quick = bool(spec.settings.get("quick", True))
        if self.takes_prepare_model:
            value = self.function(
                make_optimizer,
                spec.seed,
                quick,
                prepare_model=functools.partial(model_for_optimizer, optimizer=spec.optimizer),
            )
        else:
            value = self.function(make_optimizer, spec.seed, quick)
        return _check_output(value, self.function.__name__, self.spec)


def load_user_task(reference: str, source: str | None = None) -> UserTask:
    """Load the decorated function ``reference`` names (raises :class:`TaskLoadError`)."""
    function, module, text, path = _resolve(reference, source)
    return UserTask(reference, function, module, text, path)


def task_from_payload(payload: dict[str, Any]) -> UserTask:
    """The user task a worker was sent (its shipped source for file-based tasks)."""
    info = payload["user"]
    task = load_user_task(info["reference"], info.get("source"))
    if task.fingerprint != info["fingerprint"]:
        raise TaskLoadError(
            f"task {info['reference']!r}: the source on this worker differs from the driver's"
        )
    task.name = info["name"]  # type: ignore[misc]
    return task
