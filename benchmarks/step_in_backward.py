"""Memory and time of ``AdaBelief(step_in_backward=True)`` against the ordinary step.

A training loop (zero_grad, forward, backward, step) of an MLP whose gradients are a large share
of its memory (default 11 layers of 2048 x 2048: 46.2M parameters, 176 MiB of float32 gradients,
batch 64 so that activations are small). Run::

    python benchmarks/step_in_backward.py                 # CPU, about two minutes on 2 cores
    python benchmarks/step_in_backward.py --device cuda   # adds torch's allocator peak

**Memory.** Each (malloc setting, variant) runs in a fresh subprocess for its whole life, so that
its peak resident memory (``VmHWM``, MiB; ``ru_maxrss`` agrees) is that loop's own; the runs
alternate, in reverse order every other round. On CUDA, torch's allocator peak over the loop
(above its level at the loop's start, no gradient held) is printed too. Two settings of glibc's
malloc, which decides what the resident memory shows:

* ``default``: glibc raises its mmap threshold dynamically once it has freed a large mapping, so
  later 16 MiB tensors come from its heap, where freed gradients can stay as free but resident
  pages: the resident memory falls by less than the live tensors do, by an amount that varies
  from process to process. (When the optimizer state was created during the first backward,
  between gradients freed at once, ``mallinfo2`` reported about 170 MiB free but resident there
  and the saving all but vanished; AdaBelief now creates it with the optimizer.)
* ``mmap``: ``MALLOC_MMAP_THRESHOLD_=131072`` fixes the threshold at 128 KiB, so each large
  tensor is its own mapping, returned to the system when freed: resident memory follows the live
  tensors.

The saving (ordinary - in-backward, also in units of the gradients' size) should be close to the
size of the gradients (4 bytes per parameter): the ordinary loop holds all of them between
backward and step, the in-backward one at most the gradients in flight.

**Time.** One more subprocess builds both variants (same weights) and alternates their
iterations (ABBA...), so that a noisy shared machine slows both alike; it prints the median of the
per-pair ratios in-backward / ordinary, with the median seconds of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 2**20
VARIANTS = ("ordinary", "in_backward")
#: Environment of each glibc malloc setting (see the module docstring).
MALLOC = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loop(args: argparse.Namespace, in_backward: bool) -> tuple[int, Callable[[], None]]:
    """(parameter count, one training iteration) of a fresh model and AdaBelief."""
    import torch

    from adabelief import AdaBelief

    torch.manual_seed(0)
    device = torch.device(args.device)
    layers: list[torch.nn.Module] = []
    for _ in range(args.depth):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(device)
    optimizer = AdaBelief(
        model.parameters(), lr=1e-4, state_precision=args.precision, step_in_backward=in_backward
    )
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randn(args.batch, args.width, device=device)

    def iteration() -> None:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return sum(p.numel() for p in model.parameters()), iteration


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant for this process's life: warm-up (builds the state), then the loop."""
    import torch

    torch.set_num_threads(args.threads)
    params, iteration = _loop(args, args.variant == "in_backward")
    iteration()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()  # (the ordinary loop's gradients still held)
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.memory_iters):
        iteration()
    result = {
        "params": params,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        result["allocator_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        result["allocator_start_mib"] = start / MIB
    return result


def time_child(args: argparse.Namespace) -> dict[str, Any]:
    """Both variants in this process, their iterations alternating (ABBA...)."""
    import torch

    torch.set_num_threads(args.threads)
    iterations = [_loop(args, in_backward)[1] for in_backward in (False, True)]
    for iteration in iterations:
        iteration()
    seconds: list[list[float]] = [[], []]
    for k in range(args.time_pairs):
        for index in (0, 1) if k % 2 == 0 else (1, 0):
            begin = time.perf_counter()
            iterations[index]()
            seconds[index].append(time.perf_counter() - begin)
    ratios = [b / a for a, b in zip(*seconds, strict=True)]
    return {
        "ordinary_s": statistics.median(seconds[0]),
        "in_backward_s": statistics.median(seconds[1]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def _run_child(args: argparse.Namespace, role: str, env_extra: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, __file__, f"--child={role}"]
    for name in ("width", "depth", "batch", "memory_iters", "time_pairs", "threads", "precision",
                 "device"):  # fmt: skip
        command.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **env_extra}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {role} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=11, help="Linear layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="memory runs of each variant")
    parser.add_argument("--memory-iters", type=int, default=3, help="iterations after warm-up")
    parser.add_argument("--time-pairs", type=int, default=12, help="timed iterations of each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--child", choices=("ordinary", "in_backward", "time"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child == "time":
        print(json.dumps(time_child(args)))
        return
    if args.child is not None:
        args.variant = args.child
        print(json.dumps(memory_child(args)))
        return

    runs = [(malloc, variant) for malloc in MALLOC for variant in VARIANTS]
    memory: dict[tuple[str, str], list[dict[str, Any]]] = {run: [] for run in runs}
    for round_index in range(args.rounds):
        for malloc, variant in runs if round_index % 2 == 0 else runs[::-1]:
            result = _run_child(args, variant, MALLOC[malloc])
            memory[(malloc, variant)].append(result)
            extra = ""
            if "allocator_peak_mib" in result:
                extra = f"  allocator peak {result['allocator_peak_mib']:7.1f} MiB"
            print(
                f"round {round_index + 1}  malloc {malloc:<8} {variant:<12} peak RSS "
                f"{result['peak_rss_mib']:7.1f} MiB (ru_maxrss {result['ru_maxrss_mib']:7.1f})"
                + extra,
                flush=True,
            )
    timing = _run_child(args, "time", {})
    print(
        "time ratios in_backward/ordinary per pair:", " ".join(f"{r:.3f}" for r in timing["ratios"])
    )

    params = memory[runs[0]][0]["params"]
    grad_mib = 4 * params / MIB
    print(
        f"\nMLP {args.depth} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M "
        f"parameters, batch {args.batch}, state_precision={args.precision}, {args.device}, "
        f"{args.threads} threads; float32 gradients: {grad_mib:.1f} MiB"
    )
    keys = [("peak_rss_mib", "peak RSS"), ("allocator_peak_mib", "allocator peak")]
    for malloc in MALLOC:
        pairs = list(
            zip(memory[(malloc, "ordinary")], memory[(malloc, "in_backward")], strict=True)
        )
        for key, label in keys:
            if key not in pairs[0][0] or (key == "allocator_peak_mib" and malloc != "default"):
                continue
            ordinary = statistics.median(a[key] for a, _ in pairs)
            in_backward = statistics.median(b[key] for _, b in pairs)
            saving = ordinary - in_backward
            print(
                f"{label} (malloc {malloc}, median of {args.rounds}): ordinary {ordinary:.1f} MiB,"
                f" in_backward {in_backward:.1f} MiB; saving {saving:.1f} MiB = "
                f"{saving / grad_mib:.2f} x the gradients; ratio {in_backward / ordinary:.3f}"
            )
    print(
        f"time per iteration (one process, alternating, median of {args.time_pairs} pairs): "
        f"ordinary {timing['ordinary_s']:.3f} s, in_backward {timing['in_backward_s']:.3f} s; "
        f"ratio in_backward/ordinary {timing['ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
