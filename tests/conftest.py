"""Test setup: make ``tests/`` importable (``reference.py``) and build the official optimizer
quietly."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

# CI explores the same examples every run (no example database, fixed seed): a red CI is then a
# regression, never a newly drawn example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture
def official_adabelief():
    """A factory for ``adabelief_pytorch.AdaBelief`` (0.2.1) that swallows its prints."""
    module = pytest.importorskip("adabelief_pytorch")

    def make(params, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            return module.AdaBelief(params, print_change_log=False, **kwargs)

    return make


@pytest.fixture
def load_benchmark() -> Iterator[Callable[[str], ModuleType]]:
    """Import a script of ``benchmarks/`` by name (``load_benchmark("gpu_check")``) as a module;
    it leaves ``sys.modules`` afterwards."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture
def restore_torch_globals() -> Iterator[None]:
    """The runner sets torch's thread count and deterministic mode; undo it for other tests
    (modules that run it use ``pytestmark = pytest.mark.usefixtures("restore_torch_globals")``)."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
