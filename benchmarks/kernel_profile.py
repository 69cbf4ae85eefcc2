"""Where the fused CPU kernel's time goes: its step alone, per state format, without Python.

Builds the kernel exactly as ``adabelief.kernels.cpu`` does (its compiler command and ABI macros,
flags ``-march=native -fopenmp``) from the shipped sources, or from copies given with
``--variant DIR`` (a folder holding ``adabelief_cpu.cpp`` and its headers: a scratch edit to
compare), and a small C++ driver that calls ``adabelief_update`` on one float32 tensor (Adam-like
hyperparameters, the adaptive step, no weight decay, no AMSGrad)::

    python benchmarks/kernel_profile.py time                 # ns per element, variants alternated
    python benchmarks/kernel_profile.py time --numel 65536   # L2-resident: the compute alone
    python benchmarks/kernel_profile.py callgrind            # instructions per element
    python benchmarks/kernel_profile.py bandwidth            # in-place streams, 1 and 2 threads
    python benchmarks/kernel_profile.py adam --ablate dither --ablate dither+division
                                                             # AdaBelief.step() against torch's
                                                             # fused Adam, headline set

``--ablate NAME`` adds a scratch variant made from the shipped sources by removing one cost, to
bound what any redesign of that part could gain (the results are wrong; only the time counts):
``dither`` (the stochastic rounding's hash: each element's dither is the step key, so a free
dither of any design is no faster), ``division`` (the denominator multiplies by
``1 / sqrt(bias_correction2)`` instead of dividing, one division of the two per element); join
names with ``+`` to remove several. A pattern that no longer matches the sources stops the run.

``time`` runs every variant in turn, ``--rounds`` times, and keeps each one's best step, so that
a shared machine's load falls on all of them alike; ratios are to the first variant. Pin it for
single-thread figures: ``OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/kernel_profile.py
time``. ``callgrind`` needs valgrind; its counts do not depend on the load. ``bandwidth`` streams
in place the bytes per element of each format (fp32 28, bf16 20, int8 16: param read and written,
gradient read, the two moments read and written; int4's 14 are not streamed), the floor a step
cannot beat. ``--numel`` must be even (int4 packs two codes per byte). ``adam`` times
``AdaBelief.step()`` (the fused kernel, each variant swapped in) for each format on ``adabelief
bench``'s headline set, interleaved with ``torch.optim.Adam(fused=True)`` over ``--rounds``, at
``--threads`` (default: torch's), and prints each one's median and best step against Adam's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from adabelief.kernels import cpu

#: Scratch edits that remove one cost from the kernel (file, shipped text, replacement).
ABLATIONS: dict[str, list[tuple[str, str, str]]] = {
    "dither": [
        (
            "dither.h",
            "return mix32(to_bits(a) ^ ((v << 16) | (v >> 16)) ^ step_key);",
            "(void)a; (void)v; return step_key;",
        ),
        (
            "dither.h",
            "return mix32(_mm256_xor_si256(_mm256_xor_si256(_mm256_castps_si256(a.v), rotated), "
            "step_key));",
            "(void)a; (void)rotated; return step_key;",
        ),
    ],
    "division": [
        ("belief_update.h", "bc2(broadcast<V>(sqrt_bc2))", "bc2(broadcast<V>(1.0 / sqrt_bc2))"),
        ("belief_update.h", "root / c.bc2 + c.eps", "root * c.bc2 + c.eps"),
    ],
}

FORMATS = {
    name: cpu.CPU_ABI[f"ADABELIEF_STATE_{name.upper()}"]
    for name in ("fp32", "bf16", "int8", "int4")
}
FLAGS = ("-march=native", "-fopenmp")

DRIVER = r"""
#include <dlfcn.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "abi.h"
using Update = int (*)(const adabelief_call*);
// driver FORMAT NUMEL STEPS ROUNDS THREADS LIB...: each library's best step, ns per element
int main(int argc, char** argv) {
  const int format = atoi(argv[1]), steps = atoi(argv[3]), rounds = atoi(argv[4]);
  const long n = atol(argv[2]);
  const int threads = atoi(argv[5]), libs = argc - 6;
  std::vector<Update> update;
  for (int i = 0; i < libs; ++i) {
    void* h = dlopen(argv[6 + i], RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    update.push_back(reinterpret_cast<Update>(dlsym(h, "adabelief_update")));
  }
  std::vector<float> p(n), g(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (long i = 0; i < n; ++i) { p[i] = normal(rng); g[i] = 0.01f * normal(rng); }
  // Bytes of one moment: int4 packs two codes per byte (n is even).
  const size_t bytes = format == ADABELIEF_STATE_FP32   ? 4 * n
                       : format == ADABELIEF_STATE_BF16 ? 2 * n
                       : format == ADABELIEF_STATE_INT4 ? n / 2
                                                        : n;
  std::vector<char> m(bytes, 0), v(bytes, 0);
  const long blocks = n / ADABELIEF_INT4_BLOCK + 1;  // the smaller block: enough for both
  std::vector<float> m_scale(blocks, 0.0f), v_scale(blocks, 0.0f);
  adabelief_tensor t{};
  t.param = p.data(); t.grad = g.data(); t.exp_avg = m.data(); t.exp_avg_var = v.data();
  t.exp_avg_scale = m_scale.data(); t.exp_avg_var_scale = v_scale.data();
  t.numel = n; t.step_size = 1e-3; t.sqrt_bc2 = 0.5; t.kind = ADABELIEF_KIND_ADAPTIVE;
  adabelief_call call{};
  call.dtype = ADABELIEF_DTYPE_FLOAT32; call.format = format; call.num_threads = threads;
  call.n = 1; call.tensors = &t;
  call.options = {0.9, 0.999, 1e-16, 1.0, 0.0, 1.0};
  for (int s = 0; s < 3; ++s) update[0](&call);  // moments away from zero
  std::vector<double> best(libs, 1e30);
  for (int r = 0; r < rounds; ++r)
    for (int l = 0; l < libs; ++l)
      for (int s = 0; s < steps; ++s) {
        t.step_key = 0x9e3779b9u * unsigned(s + 7);
        const auto a = std::chrono::steady_clock::now();
        update[l](&call);
        const auto b = std::chrono::steady_clock::now();
        const double ns = std::chrono::duration<double, std::nano>(b - a).count() / double(n);
        if (ns < best[l]) best[l] = ns;
      }
  for (int l = 0; l < libs; ++l) printf("%.4f\n", best[l]);
}
"""

STREAMS = r"""
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <omp.h>
// In-place streams with each format's bytes per element; best of 10, ns per element.
template <typename M>
void step(long b, long e, float* __restrict p, const float* __restrict g, M* __restrict m,
          M* __restrict v) {
  for (long i = b; i < e; ++i) {
    p[i] = p[i] - 1e-9f * g[i];
    m[i] = M(m[i] + M(1));
    v[i] = M(v[i] * M(3));
  }
}
template <typename M> double run(long n, int threads) {
  float* p = static_cast<float*>(malloc(n * 4));
  float* g = static_cast<float*>(malloc(n * 4));
  M* m = static_cast<M*>(malloc(n * sizeof(M)));
  M* v = static_cast<M*>(malloc(n * sizeof(M)));
  for (long i = 0; i < n; ++i) { p[i] = 1; g[i] = 1; m[i] = M(0); v[i] = M(1); }
  double best = 1e30;
  for (int r = 0; r < 10; ++r) {
    const auto a = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
    {
      const long t = omp_get_thread_num(), k = omp_get_num_threads();
      step(n * t / k, n * (t + 1) / k, p, g, m, v);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    best = s < best ? s : best;
  }
  free(p); free(g); free(m); free(v);
  return best / double(n) * 1e9;
}
int main(int argc, char** argv) {
  const long n = atol(argv[1]);
  for (int threads = 1; threads <= 2; ++threads) {
    const double f = run<float>(n, threads), h = run<uint16_t>(n, threads);
    const double b = run<uint8_t>(n, threads);
    printf("%d threads: fp32 (28 B) %.3f ns/elem %.1f GB/s, bf16 (20 B) %.3f ns/elem %.1f GB/s,"
           " int8 (16 B) %.3f ns/elem %.1f GB/s\n", threads, f, 28 / f, h, 20 / h, b, 16 / b);
  }
}
"""


def _compiler() -> str:
    found = cpu.compiler()
    if found is None:
        sys.exit("no C++ compiler")
    return found


def build_kernel(source: Path, work: Path, name: str) -> Path:
    """The kernel of the sources in ``source`` (copied into ``work/name``) as a shared library."""
    folder = work / name
    shutil.copytree(source, folder)
    library = folder / "kernel.so"
    command = cpu.build_command(_compiler(), FLAGS, folder / "adabelief_cpu.cpp", library)
    subprocess.run(command, check=True)
    return library


def ablated_sources(shipped: Path, work: Path, name: str) -> Path:
    """A copy of the ``shipped`` sources with the edits of every ablation in ``name`` (joined by
    ``+``); exits when an edit's text is not in its file (the sources changed)."""
    folder = work / f"ablate-{name}"
    shutil.copytree(shipped, folder)
    for part in name.split("+"):
        if part not in ABLATIONS:
            sys.exit(f"--ablate {part}: unknown; choose from {', '.join(ABLATIONS)}")
        for file, old, new in ABLATIONS[part]:
            text = (folder / file).read_text()
            if old not in text:
                sys.exit(f"--ablate {part}: {file} no longer contains {old!r}")
            (folder / file).write_text(text.replace(old, new))
    return folder


def time_against_adam(
    libraries: list[tuple[str, Path]], formats: list[str], rounds: int, threads: int
) -> None:
    """Median and best ``AdaBelief.step()`` of each format and kernel on the headline set,
    interleaved with ``torch.optim.Adam(fused=True)`` over the same parameters."""
    import statistics
    import time

    import torch

    from adabelief import AdaBelief
    from adabelief.experiments import bench

    torch.set_num_threads(threads)
    params = bench.make_params(bench.PARAM_SETS[bench.HEADLINE])
    kernels = {name: cpu._Kernel(path) for name, path in libraries}
    rows: dict[str, tuple[torch.optim.Optimizer, object]] = {
        "torch Adam (fused)": (torch.optim.Adam(params, lr=1e-3, fused=True), None)
    }
    for fmt in formats:
        for name, kernel in kernels.items():
            optimizer = AdaBelief(params, lr=1e-3, state_precision=fmt)
            rows[f"{fmt} {name}"] = (optimizer, kernel)
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(rounds):
        for row, (optimizer, kernel) in rows.items():
            if kernel is not None:
                cpu._kernel = kernel  # type: ignore[assignment]  # the process's kernel
            optimizer.step()
            optimizer.step()  # warm: state allocated, caches as in training
            start = time.perf_counter()
            for _ in range(3):
                optimizer.step()
            seconds[row].append((time.perf_counter() - start) / 3)
    adam = seconds["torch Adam (fused)"]
    numel = sum(p.numel() for p in params)
    print(f"{bench.HEADLINE}: {numel:,} parameters, {threads} threads, {rounds} rounds")
    for row, times in seconds.items():
        median, best = statistics.median(times), min(times)
        print(
            f"{row}: median {median * 1e3:.2f} ms ({median / statistics.median(adam):.3f}x "
            f"Adam), best {best * 1e3:.2f} ms ({best / min(adam):.3f}x Adam)"
        )


def build_driver(headers: Path, work: Path) -> Path:
    (work / "driver.cpp").write_text(DRIVER)
    driver = work / "driver"
    macros = [f"-D{k}={v}" for k, v in cpu.CPU_ABI.items()]
    subprocess.run(
        [
            _compiler(),
            "-O2",
            "-std=c++17",
            f"-I{headers}",
            *macros,
            str(work / "driver.cpp"),
            "-o",
            str(driver),
            "-ldl",
        ],
        check=True,
    )
    return driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["time", "callgrind", "bandwidth", "adam"])
    parser.add_argument("--variant", action="append", default=[], type=Path, metavar="DIR")
    parser.add_argument("--ablate", action="append", default=[], metavar="NAME[+NAME]")
    parser.add_argument("--formats", default="fp32,bf16,int8,int4")
    parser.add_argument("--numel", type=int, default=10_900_000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is None:
        if args.mode == "adam":
            import torch

            args.threads = torch.get_num_threads()
        else:
            args.threads = int(os.environ.get("OMP_NUM_THREADS", 1))
    with tempfile.TemporaryDirectory(prefix="adabelief-profile-") as tmp:
        work = Path(tmp)
        if args.mode == "bandwidth":
            (work / "streams.cpp").write_text(STREAMS)
            subprocess.run(
                [
                    _compiler(),
                    "-O3",
                    "-march=native",
                    "-fopenmp",
                    str(work / "streams.cpp"),
                    "-o",
                    str(work / "streams"),
                ],
                check=True,
            )
            subprocess.run([str(work / "streams"), str(max(args.numel, 50_000_000))], check=True)
            return
        shipped = work / "shipped-sources"
        shipped.mkdir()
        cpu.write_sources(shipped)
        sources = [("shipped", shipped)] + [(str(v), v) for v in args.variant]
        sources += [(f"-{a}", ablated_sources(shipped, work, a)) for a in args.ablate]
        libraries = [build_kernel(s, work, f"k{i}") for i, (_, s) in enumerate(sources)]
        if args.mode == "adam":
            named = [(name, lib) for (name, _), lib in zip(sources, libraries, strict=True)]
            time_against_adam(named, args.formats.split(","), args.rounds, args.threads)
            return
        driver = build_driver(shipped, work)
        for fmt in args.formats.split(","):
            if args.mode == "time":
                out = subprocess.run(
                    [
                        str(driver),
                        str(FORMATS[fmt]),
                        str(args.numel),
                        str(args.steps),
                        str(args.rounds),
                        str(args.threads),
                        *map(str, libraries),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()
                first = float(out[0])
                for (name, _), ns in zip(sources, map(float, out), strict=True):
                    print(f"{fmt} {name}: {ns:.4f} ns/elem, {ns / first:.3f}x the first")
            else:
                for (name, _), library in zip(sources, libraries, strict=True):
                    print(
                        f"{fmt} {name}: {_instructions(driver, library, fmt, work):.3f} instr/elem"
                    )


def _instructions(driver: Path, library: Path, fmt: str, work: Path) -> float:
    """Instructions per element inside adabelief_update: 13 calls on 65,536 elements."""
    out = work / "callgrind.out"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=adabelief_update",
            f"--callgrind-out-file={out}",
            str(driver),
            str(FORMATS[fmt]),
            "65536",
            "10",
            "1",
            "1",
            str(library),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    summary = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
    if summary is None:
        sys.exit("no callgrind summary")
    return int(summary.group(1)) / (13 * 65536)


if __name__ == "__main__":
    main()
