"""Bytes per parameter of a training loop, per configuration of weights, state and step.

Each configuration trains the same MLP (default 8 x Linear(1024, 1024), 8.4M parameters, batch
64) with the loop ``zero_grad(); loss.backward(); step()`` and reports:

* **persistent bytes per parameter**: what the loop holds between two iterations or keeps from
  backward to step, over the parameter count: the weights, the gradients alive when
  ``backward()`` returns (all of them for the ordinary step, none when the step runs in
  backward), and every tensor of the optimizer state (moments, block scales, step counts);
* **peak resident memory** (``VmHWM``) of a fresh subprocess that runs only that configuration,
  above its resident memory before the model was built (after a tiny model of the same
  configuration has loaded the kernels and started the threads; the peak is reset there), in MiB
  and per parameter: activations, the allocator and the forward's temporaries included. Large
  tensors are their own mappings (``MALLOC_MMAP_THRESHOLD_=131072``), so freed ones leave;
* **time per iteration** against torch's fused Adam on a float32 model: one subprocess builds
  both loops (same initial weights) and alternates their iterations (ABBA...), so that a noisy
  shared machine slows both alike; the median of the per-pair ratios. On the CPU a bfloat16 model
  also runs its forward and backward in bfloat16, which this ratio includes.

Run::

    python benchmarks/memory_per_parameter.py                  # every configuration, CPU
    python benchmarks/memory_per_parameter.py --configs fp32 int8-sib --width 512

Configurations (``--configs``, default all):

* ``adam``: torch's fused Adam, float32 model, ordinary step (the reference, 16 bytes);
* ``fp32``: AdaBelief, float32 model and state, ordinary step (16 bytes);
* ``int8-sib``: float32 model, int8 moments, step in backward (about 6 bytes);
* ``bf16-round-int8-sib``: bfloat16 model rounded at each step (no master weight), int8
  moments, step in backward (about 4 bytes; the update below half a bfloat16 unit in the last
  place is lost, see docs/low-memory-state.md);
* ``bf16-residual-int8-sib``: the same with ``master_weights="residual"``, an int8 residual that
  restores the float32 master weight (about 5 bytes: 2 + 1 + 2.03);
* ``bf16-fp32master-int8-sib``: the same with a float32 master weight (about 8 bytes);
* ``bf16-stochastic-int8-sib``: the same with stochastic rounding of the weight (about 4 bytes);
* ``int4-sib``: float32 model, int4 moments, step in backward (about 5 bytes);
* ``bf16-residual-int4-sib``: bfloat16 model with ``master_weights="residual"``, int4 moments,
  step in backward (about 4 bytes: 2 + 1 + 1.06).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20


@dataclass(frozen=True)
class Config:
    """One configuration: the model's dtype and the optimizer that trains it."""

    description: str
    dtype: str = "float32"
    optimizer: str = "adabelief"
    options: dict[str, Any] = field(default_factory=dict)


CONFIGS = {
    "adam": Config("torch Adam (fused), fp32 model", optimizer="adam"),
    "fp32": Config("AdaBelief, fp32 model and state"),
    "int8-sib": Config(
        "AdaBelief, fp32 model, int8 state, step in backward",
        options={"state_precision": "int8", "step_in_backward": True},
    ),
    "bf16-round-int8-sib": Config(
        "AdaBelief, bf16 model (rounded, no master), int8 state, step in backward",
        dtype="bfloat16",
        options={"state_precision": "int8", "step_in_backward": True},
    ),
    "bf16-residual-int8-sib": Config(
        "AdaBelief, bf16 model + int8 residual, int8 state, step in backward",
        dtype="bfloat16",
        options={"state_precision": "int8", "step_in_backward": True, "master_weights": "residual"},
    ),
    "bf16-fp32master-int8-sib": Config(
        "AdaBelief, bf16 model + fp32 master, int8 state, step in backward",
        dtype="bfloat16",
        options={"state_precision": "int8", "step_in_backward": True, "master_weights": "fp32"},
    ),
    "bf16-stochastic-int8-sib": Config(
        "AdaBelief, bf16 model (stochastic rounding), int8 state, step in backward",
        dtype="bfloat16",
        options={
            "state_precision": "int8",
            "step_in_backward": True,
            "master_weights": "stochastic",
        },
    ),
    "int4-sib": Config(
        "AdaBelief, fp32 model, int4 state, step in backward",
        options={"state_precision": "int4", "step_in_backward": True},
    ),
    "bf16-residual-int4-sib": Config(
        "AdaBelief, bf16 model + int8 residual, int4 state, step in backward",
        dtype="bfloat16",
        options={"state_precision": "int4", "step_in_backward": True, "master_weights": "residual"},
    ),
}
REFERENCE = "adam"


def _resident_kib(field_name: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class Loop:
    """A fresh MLP of ``config``'s dtype, its optimizer and one training iteration."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        import torch

        from adabelief import AdaBelief

        torch.manual_seed(0)
        dtype = getattr(torch, config.dtype)
        layers: list[torch.nn.Module] = []
        for _ in range(args.depth):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*layers[:-1]).to(dtype)
        params = list(self.model.parameters())
        if config.optimizer == "adam":
            self.optimizer: Any = torch.optim.Adam(params, lr=1e-4, fused=True)
        else:
            self.optimizer = AdaBelief(params, lr=1e-4, **config.options)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(args.batch, args.width, generator=generator).to(dtype)
        self.y = torch.randn(args.batch, args.width, generator=generator).to(dtype)
        self.numel = sum(p.numel() for p in params)
        self.grad_bytes_after_backward = 0

    def iteration(self) -> None:
        import torch

        self.optimizer.zero_grad()
        torch.nn.functional.mse_loss(self.model(self.x), self.y).backward()
        self.grad_bytes_after_backward = sum(
            _nbytes(p.grad) for p in self.model.parameters() if p.grad is not None
        )
        self.optimizer.step()

    def persistent_bytes(self) -> dict[str, int]:
        """Weights, gradients alive when backward returned, and optimizer state, in bytes."""
        state = 0
        for entry in self.optimizer.state.values():
            for value in entry.values():
                state += _tensor_bytes(value)
        weights = sum(_nbytes(p) for p in self.model.parameters())
        return {"weights": weights, "grads": self.grad_bytes_after_backward, "state": state}


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a state entry (a tensor, or a list/tuple/dict of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        inner = getattr(value, "__tensor_flatten__", None)
        if inner is not None and type(value) is not torch.Tensor:  # a tensor subclass
            names, _ = inner()
            return sum(_tensor_bytes(getattr(value, name)) for name in names)
        return _nbytes(value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration for this process's life: warm-up (builds the state), then the loop."""
    import torch

    torch.set_num_threads(args.threads)
    tiny = argparse.Namespace(**{**vars(args), "width": 16, "depth": 2})
    Loop(CONFIGS[args.child_config], tiny).iteration()  # loads kernels, starts the threads
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    start_kib = _resident_kib("VmRSS")
    loop = Loop(CONFIGS[args.child_config], args)
    for _ in range(1 + args.memory_iters):
        loop.iteration()
    return {
        "numel": loop.numel,
        "bytes": loop.persistent_bytes(),
        "peak_above_start_mib": (_resident_kib("VmHWM") - start_kib) / 1024,
    }


def time_child(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration and the reference in this process, iterations alternating (ABBA...)."""
    import torch

    torch.set_num_threads(args.threads)
    loops = [Loop(CONFIGS[REFERENCE], args), Loop(CONFIGS[args.child_config], args)]
    for loop in loops:
        loop.iteration()
    seconds: list[list[float]] = [[], []]
    for k in range(args.time_pairs):
        for index in (0, 1) if k % 2 == 0 else (1, 0):
            begin = time.perf_counter()
            loops[index].iteration()
            seconds[index].append(time.perf_counter() - begin)
    ratios = [b / a for a, b in zip(*seconds, strict=True)]
    return {
        "reference_s": statistics.median(seconds[0]),
        "config_s": statistics.median(seconds[1]),
        "ratio": statistics.median(ratios),
    }


def _run_child(args: argparse.Namespace, role: str, config: str) -> dict[str, Any]:
    command = [sys.executable, __file__, f"--child={role}", f"--child-config={config}"]
    for name in ("width", "depth", "batch", "memory_iters", "time_pairs", "threads"):
        command.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {role} run of {config} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows, one per configuration."""
    rows = [
        "| configuration | weights | gradients | state | persistent B/param | "
        "peak RSS above start | time vs fused Adam |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        memory, timing = result["memory"], result.get("time")
        numel = memory["numel"]
        parts = [memory["bytes"][k] / numel for k in ("weights", "grads", "state")]
        peak = memory["peak_above_start_mib"]
        ratio = "1 (reference)" if timing is None else f"{timing['ratio']:.2f}x"
        rows.append(
            f"| {name}: {CONFIGS[name].description} | {parts[0]:.2f} | {parts[1]:.2f} | "
            f"{parts[2]:.2f} | **{sum(parts):.2f}** | {peak:.0f} MiB "
            f"({peak * MIB / numel:.1f} B/param) | {ratio} |"
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8, help="Linear layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--memory-iters", type=int, default=3, help="iterations after warm-up")
    parser.add_argument("--time-pairs", type=int, default=10, help="timed iterations of each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--child-config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "memory":
        print(json.dumps(memory_child(args)))
        return {}
    if args.child == "time":
        print(json.dumps(time_child(args)))
        return {}

    results: dict[str, dict[str, Any]] = {}
    for name in args.configs:
        results[name] = {"memory": _run_child(args, "memory", name)}
        if name != REFERENCE:
            results[name]["time"] = _run_child(args, "time", name)
        print(f"measured {name}", file=sys.stderr, flush=True)
    numel = next(iter(results.values()))["memory"]["numel"]
    print(
        f"MLP {args.depth} x Linear({args.width}, {args.width}), {numel / 1e6:.1f}M parameters, "
        f"batch {args.batch}, CPU, {args.threads} threads\n"
    )
    print("\n".join(table(results)))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
