"""The fused CPU kernel under AddressSanitizer: every read and write it makes stays inside the
tensors it is given.

The kernel is built with ``-fsanitize=address`` (``$ADABELIEF_CPU_CFLAGS``, into a cache of
this test's own) and the kernel tests run in a subprocess with the sanitizer's runtime
preloaded, so that torch's allocations get red zones too. A control first steps a moment one
block too short with the size check switched off: the sanitizer must stop that process with a
heap-buffer-overflow, or the run proves nothing. Linux with gcc or clang and its libasan only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adabelief.kernels import cpu

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: The kernel tests to run sanitized (torch.compile is left out: dynamo aborts when C++
#: exceptions cross the preloaded runtime, with or without the kernel).
SANITIZED_TESTS = ["tests/test_compressed_kernels.py", "tests/test_state_int4.py"]
SANITIZED_FILTER = "not compile and not compiled"
TIMEOUT_S = 900


def _asan_runtime() -> str | None:
    """The path of the compiler's AddressSanitizer runtime, or None."""
    compiler = cpu.compiler()
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    try:
        found = subprocess.run(
            [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if found and os.path.isabs(found) and os.path.exists(found) else None


@pytest.fixture(scope="module")
def sanitized_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    runtime = _asan_runtime()
    if runtime is None:
        pytest.skip("no AddressSanitizer runtime beside the C++ compiler (Linux, gcc or clang)")
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=runtime,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        ADABELIEF_CPU_CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g",
        ADABELIEF_CACHE_DIR=str(tmp_path_factory.mktemp("asan_kernel")),
        OMP_NUM_THREADS="2",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(cpu.__file__).resolve().parents[2]), env.get("PYTHONPATH")])
        ),
    )
    return env


_CONTROL = textwrap.dedent(
    """
    import torch
    from adabelief.kernels import cpu, dispatch
    from adabelief import compressed_state as cs

    lib = cpu.kernel()
    assert lib is not None, cpu.kernel_error()
    print("kernel", lib.path, flush=True)
    cpu._check_sizes = lambda part, fmt: [p.numel() for p in part.params]  # the guard, off
    param = torch.zeros(64, 256)
    moments = [cs.INT8.zeros(param, belief) for belief in (False, True)]
    short = torch.zeros(64 * 256 - 256, dtype=torch.uint8)
    moments[1] = moments[1]._replace(codes=short)
    dispatch.adabelief(
        [param], [torch.ones_like(param)], moments[:1], moments[1:], [], [torch.zeros(())],
        fused=True,
    )
    print("stepped past the end unnoticed", flush=True)
    """
)


def test_the_sanitizer_catches_a_moment_too_short(sanitized_env):
    """The control: without it, a sanitized run that finds nothing would prove nothing."""
    result = subprocess.run(
        [sys.executable, "-c", _CONTROL],
        env=sanitized_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )
    assert "kernel " in result.stdout, result.stdout + result.stderr[-3000:]
    assert result.returncode != 0, "the kernel ran past the moment and nothing stopped it"
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-3000:]
    assert "stepped past the end" not in result.stdout


def test_kernel_tests_pass_under_address_sanitizer(sanitized_env):
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",  # in this process, not on the parallel workers of pyproject's addopts
        "-m",
        "not slow",
        "-k",
        SANITIZED_FILTER,
        *SANITIZED_TESTS,
    ]
    result = subprocess.run(
        command, env=sanitized_env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert "AddressSanitizer" not in output, output[-6000:]
    assert result.returncode == 0, output[-6000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], (
        result.stdout[-2000:]
    )
