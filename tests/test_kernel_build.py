"""The C++ kernel source: it compiles cleanly with warnings as errors, refuses to build without
the ABI macros, and keys the build cache by its bytes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
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
@pytest.mark.slow  # four compiler builds
def test_kernel_compiles_with_warnings_as_errors(tmp_path, target, level):
    """Both forms of the source, the portable loops and the AVX2 ones (compiled, not run, so
    this holds on any x86-64 machine), at -O3 as shipped and at -O1, whose flow analysis
    differs (each level has found a warning the other did not)."""
    source = cpu.write_sources(tmp_path)
    flags = ("-fopenmp", *target, *WARNINGS)
    command = cpu.build_command(str(COMPILER), flags, source, tmp_path / "k.so")
    command[command.index("-O3")] = level
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@needs_compiler
def test_kernel_refuses_to_build_without_the_abi_macros(tmp_path):
    source = cpu.write_sources(tmp_path)
    command = [str(COMPILER), "-std=c++17", "-fsyntax-only", str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ABI macros" in done.stderr


def test_the_abi_table_is_what_the_source_expects():
    text = "".join(data.decode() for data in cpu.source_files().values())
    for name in cpu.CPU_ABI:
        assert name in text, name


def test_the_sources_are_the_entry_and_the_headers_it_includes():
    """Every file the kernel includes with quotes ships beside it (and so is in the cache key)."""
    import re

    files = cpu.source_files()
    assert "adabelief_cpu.cpp" in files
    for name, data in files.items():
        for included in re.findall(rb'#include "([^"]+)"', data):
            assert included.decode() in files, f"{name} includes {included!r}"


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
    monkeypatch.undo()
    monkeypatch.setenv("ADABELIEF_CACHE_DIR", str(tmp_path))
    files = cpu.source_files()
    edited = {**files, "lanes.h": files["lanes.h"] + b"\n// edited\n"}
    monkeypatch.setattr(cpu, "source_files", lambda: edited)
    assert cpu._library_path(str(COMPILER), flags) != before  # a header is part of the key


# --- failure notes ----------------------------------------------------------------------------


@pytest.fixture
def one_flag_set(monkeypatch, tmp_path):
    """An empty cache, one flag set and a stand-in compiler (a real file, never run: each test
    replaces the compiler run). Returns the path of that flag set's failure note."""
    monkeypatch.setenv("ADABELIEF_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ADABELIEF_DISABLE_FUSED", raising=False)
    monkeypatch.setattr(cpu, "_FLAG_SETS", (("-fopenmp",),))
    monkeypatch.setattr(cpu, "compiler", lambda: sys.executable)
    return cpu._library_path(sys.executable, ("-fopenmp",)).with_suffix(".failed")


def fake_compiler(monkeypatch, returncode, stderr):
    """Replace the compiler run by one that fails with ``returncode`` and ``stderr``; returns
    the list of the commands it was given."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(cpu.subprocess, "run", run)
    return calls


def test_a_rejected_flag_set_is_noted_with_where_and_how_to_retry(monkeypatch, one_flag_set):
    calls = fake_compiler(monkeypatch, 1, "c++: error: unrecognized command-line option")
    with pytest.raises(OSError) as info:
        cpu._load_kernel()
    assert len(calls) == 1 and one_flag_set.exists()
    message = str(info.value)
    assert "unrecognized command-line option" in message
    assert f"noted in {one_flag_set}" in message and "retried within 24 h" in message
    assert "delete it" in message
    with pytest.raises(OSError, match="unrecognized"):  # honoured: not compiled again
        cpu._load_kernel()
    assert len(calls) == 1


def test_a_failure_note_expires_after_a_day(monkeypatch, one_flag_set):
    """One transient failure must not disable the kernel for good: a note older than
    FAILED_NOTE_TTL_S is deleted and the flag set tried again."""
    assert cpu.FAILED_NOTE_TTL_S == 24 * 3600
    one_flag_set.parent.mkdir(parents=True, exist_ok=True)
    one_flag_set.write_text("an old failure")
    calls = fake_compiler(monkeypatch, 1, "error: a new failure")
    with pytest.raises(OSError, match="an old failure"):
        cpu._load_kernel()
    assert not calls
    old = time.time() - cpu.FAILED_NOTE_TTL_S - 60
    os.utime(one_flag_set, (old, old))
    with pytest.raises(OSError, match="a new failure"):
        cpu._load_kernel()
    assert len(calls) == 1, "the expired note was not retried"
    assert "a new failure" in one_flag_set.read_text()


@pytest.mark.parametrize(
    ("returncode", "stderr"),
    [
        (1, "g++: fatal error: Killed signal terminated program cc1plus"),
        (1, "cc1plus: out of memory allocating 65536 bytes"),
        (1, "virtual memory exhausted: Cannot allocate memory"),
        (1, "fatal error: error writing to /tmp/cc.s: No space left on device"),
        (1, "internal compiler error: Segmentation fault"),
        (-9, ""),
    ],
    ids=["killed", "oom", "vm-exhausted", "disk-full", "ice", "signal"],
)
def test_a_transient_compiler_failure_leaves_no_note(monkeypatch, one_flag_set, returncode, stderr):
    """A compiler killed or out of memory says nothing about the flags: the next process (here,
    the next call) tries again."""
    calls = fake_compiler(monkeypatch, returncode, stderr)
    for attempt in (1, 2):
        with pytest.raises(OSError, match="failed"):
            cpu._load_kernel()
        assert len(calls) == attempt
    assert not one_flag_set.exists()


def test_a_note_is_keyed_by_the_compiler_the_flags_and_the_source(monkeypatch, tmp_path):
    """A new compiler (path, size or time stamp), other flags or an edited source is a new key,
    so a note left by the old ones is not consulted."""
    monkeypatch.setenv("ADABELIEF_CACHE_DIR", str(tmp_path))
    fake = tmp_path / "c++"
    fake.write_bytes(b"#!/bin/sh\n")
    flags = ("-fopenmp",)
    before = cpu._library_path(str(fake), flags)
    assert cpu._library_path(str(fake), ("-march=native",)) != before
    assert cpu._library_path(str(tmp_path / "c++"), flags) == before
    os.utime(fake, ns=(0, 123_456_789))  # upgraded in place
    assert cpu._library_path(str(fake), flags) != before
    changed = cpu._library_path(str(fake), flags)
    original = cpu.source()
    monkeypatch.setattr(cpu, "source", lambda: original + b"\n// edited\n")
    assert cpu._library_path(str(fake), flags) != changed
