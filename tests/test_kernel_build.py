"""The C++ kernel source: it compiles cleanly with warnings as errors, refuses to build without
the ABI macros, and keys the build cache by its bytes."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from adabelief.kernels import cpu

COMPILER = cpu.compiler()
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler here")
needs_x86 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 is an x86-64 extension"
)
WARNINGS = ("-Wall", "-Wextra", "-Wshadow", "-Wconversion", "-Wno-sign-conversion", "-Werror")


@needs_compiler
@pytest.mark.parametrize(
    "target",
    [(), pytest.param(("-mavx2", "-mfma"), marks=needs_x86)],
    ids=["portable", "avx2"],
)
@pytest.mark.parametrize("level", ["-O1", "-O3"])
def test_kernel_compiles_with_warnings_as_errors(tmp_path, target, level):
    """Both forms of the source, the portable loops and the AVX2 ones (compiled, not run, so
    this holds on any x86-64 machine), at -O3 as shipped and at -O1, whose flow analysis
    differs (each level has found a warning the other did not)."""
    source = tmp_path / "adabelief_cpu.cpp"
    source.write_bytes(cpu.source())
    flags = ("-fopenmp", *target, *WARNINGS)
    command = cpu.build_command(str(COMPILER), flags, source, tmp_path / "k.so")
    command[command.index("-O3")] = level
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@needs_compiler
def test_kernel_refuses_to_build_without_the_abi_macros(tmp_path):
    source = tmp_path / "adabelief_cpu.cpp"
    source.write_bytes(cpu.source())
    command = [str(COMPILER), "-std=c++17", "-fsyntax-only", str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ABI macros" in done.stderr


def test_the_abi_table_is_what_the_source_expects():
    text = cpu.source().decode()
    for name in cpu.CPU_ABI:
        assert name in text, name


def test_the_cache_key_is_the_source_bytes(monkeypatch, tmp_path):
    if COMPILER is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("ADABELIEF_CACHE_DIR", str(tmp_path))
    flags = ("-fopenmp",)
    before = cpu._library_path(str(COMPILER), flags)
    assert before == cpu._library_path(str(COMPILER), flags)
    original = cpu.source()
    monkeypatch.setattr(cpu, "source", lambda: original + b"\n// edited\n")
    assert cpu._library_path(str(COMPILER), flags) != before
    assert Path(before).parent == tmp_path
