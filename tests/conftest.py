"""Test setup: make ``tests/`` importable (``reference.py``) and build the official optimizer
quietly."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

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
