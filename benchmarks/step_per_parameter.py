"""The optimizer step alone, in ns per parameter, per state format, through ``AdaBelief.step()``.

Each row is one optimizer over one large tensor (default 2048 x 2048, 4.2M parameters) with a
fixed gradient: float32 weights, and bfloat16 weights with ``master_weights="residual"``, each
in every ``--precisions`` format, on the default path (the fused CPU kernel). With
``--eager-int4``, int4 rows are also stepped the way the dispatcher stepped them before the
kernel had int4 code: the eager tensor step (``tensor_math.tensor_step``), by leaving int4 out of
the kernel's formats for those rows only. The rows take turns, ``--steps`` steps each, for
``--rounds`` rounds, so that a shared machine's load falls on all of them alike; each row's
best step and median step are reported. For one thread, pin it::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/step_per_parameter.py --eager-int4

The kernel alone, without Python, is ``benchmarks/kernel_profile.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs
from adabelief.kernels import cpu

WEIGHTS = {"float32": (torch.float32, "round"), "bf16-residual": (torch.bfloat16, "residual")}


@dataclass
class Row:
    """One optimizer over one tensor, and its step times in seconds."""

    weights: str
    precision: str
    eager: bool = False
    seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.param: torch.nn.Parameter | None = None
        self.optimizer: AdaBelief | None = None

    @property
    def name(self) -> str:
        path = "eager tensor step" if self.eager else "fused kernel"
        return f"{self.weights}, {self.precision} ({path})"

    def build(self, shape: tuple[int, ...], seed: int) -> None:
        dtype, master = WEIGHTS[self.weights]
        gen = torch.Generator().manual_seed(seed)
        self.param = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(dtype))
        self.param.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        self.optimizer = AdaBelief(
            [self.param], lr=1e-3, state_precision=self.precision, master_weights=master
        )

    def step(self) -> float:
        assert self.optimizer is not None
        with _eager_int4() if self.eager else contextlib.nullcontext():
            begin = time.perf_counter()
            self.optimizer.step()
            return time.perf_counter() - begin


@contextlib.contextmanager
def _eager_int4() -> Iterator[None]:
    """The dispatcher's route for int4 before the kernel had its code: formats missing from the
    kernel's take the eager tensor step."""
    codes = {k: v for k, v in cpu._STATE_CODES.items() if k != "int4"}
    with mock.patch.dict(cpu._STATE_CODES, codes, clear=True):
        yield


def measure(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    rows = [Row(w, p) for w in args.weights for p in args.precisions]
    if args.eager_int4:
        rows += [Row(w, "int4", eager=True) for w in args.weights]
    shape = (args.rows, args.numel // args.rows)
    for i, row in enumerate(rows):
        row.build(shape, seed=i)
        for _ in range(2):  # state created, caches warm
            row.step()
        assert row.param is not None and row.optimizer is not None
        fmt = cs.format_of(row.optimizer.state[row.param])
        if fmt != row.precision:
            raise SystemExit(f"{row.name}: the state is {fmt}, not {row.precision}")
    for _ in range(args.rounds):
        for row in rows:
            row.seconds += [row.step() for _ in range(args.steps)]
    return rows


def table(rows: list[Row], numel: int) -> list[str]:
    """Markdown rows: ns per parameter of the best and the median step."""
    lines = ["| weights, state (path) | best ns/param | median ns/param |", "|---|---|---|"]
    for row in rows:
        best, median = min(row.seconds), statistics.median(row.seconds)
        lines.append(f"| {row.name} | {best / numel * 1e9:.2f} | {median / numel * 1e9:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=2048 * 2048)
    parser.add_argument("--rows", type=int, default=2048, help="first dimension (even: int4)")
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    parser.add_argument(
        "--precisions", nargs="+", default=list(cs.STATE_PRECISIONS), choices=cs.STATE_PRECISIONS
    )
    parser.add_argument("--eager-int4", action="store_true", help="also int4 on the eager step")
    parser.add_argument("--steps", type=int, default=3, help="steps of a row per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    rows = measure(args)
    numel = (args.numel // args.rows) * args.rows
    print(
        f"one {args.rows} x {args.numel // args.rows} tensor, {args.threads} torch threads, "
        f"kernel AVX2: {bool(cpu.kernel() and cpu.kernel().avx2)}\n"
    )
    print("\n".join(table(rows, numel)))
    return rows


if __name__ == "__main__":
    main()
