"""The one-call GPU check: ``python benchmarks/gpu_check.py [--out DIR] [--budget-s S]``.

On a machine with CUDA it does, in one process and within ``--budget-s`` (default 420 s, so that
the whole check stays under 8 minutes):

1. **the CUDA tests**: ``pytest -k cuda`` over ``tests/`` in a subprocess, bounded in time;
2. **agreement**: every path (single-tensor, foreach, fused, which is the compiled path on CUDA)
   in every state format (fp32, bf16, int8) steps a small model 20 times on the GPU and on the CPU
   reference path (``fused=False, foreach=False``) from the same start and gradients; the largest
   parameter difference, relative to the largest change the reference made, must stay under the
   format's tolerance;
3. **step speed**: ``optimizer.step()`` of torch's Adam (fused, foreach), the official
   ``adabelief-pytorch`` where importable, and every path and format of ours, at 10M, 100M and
   1B float32 parameters (2048x2048 matrices plus one vector for the rest), timed with CUDA events
   (median over the timed steps, after warm-up steps that include any compilation), beside
   ``dst.copy_(src)`` moving the 28 bytes per parameter of an Adam-like step. Each row gives
   ms/step, the ratio to torch's fused Adam, the fraction of copy bandwidth, the first step (state
   allocation, compilation), the bytes of state per parameter and the peak of the caching
   allocator beyond the parameters and gradients.

It writes ``DIR/gpu_check.json`` after every measurement (so a cut-off run keeps what it measured)
and ``DIR/gpu_check.md``, a Markdown table for BENCHMARKS.md. What the budget leaves out is listed
as skipped, never dropped silently. The exit status is 0 when the tests and every agreement check
pass, 1 otherwise (an agreement check the budget left out counts as not passed).

Without CUDA it says so in one line and exits 0. ``--device cpu`` runs the same measurement code
on the CPU at small sizes, which is how the test suite keeps this script working.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adabelief import AdaBelief

#: Bytes moved per float32 parameter by an Adam-like step: read p, g, m, s; write p, m, s.
BYTES_PER_PARAM = 28
SIDE = 2048
FORMATS = ("fp32", "bf16", "int8")
PATHS = {
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}
#: Agreement tolerance per format: largest |p_device - p_reference| over the largest change the
#: reference made. fp32 differs by rounding only; the compressed formats re-round their moments,
#: and a flipped stochastic rounding changes later steps by a fraction of a code.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.05}
SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000, "100K": 100_000}


@dataclass
class Check:
    """The outcome of the whole check, written as JSON."""

    machine: dict[str, Any]
    tests: dict[str, Any] = field(default_factory=dict)
    agreement: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def layout(numel: int) -> list[tuple[int, ...]]:
    """Shapes summing to ``numel``: SIDE x SIDE matrices and one vector for the remainder."""
    matrices, rest = divmod(numel, SIDE * SIDE)
    return [(SIDE, SIDE)] * matrices + ([(rest,)] if rest else [])


def make_params(shapes: list[tuple[int, ...]], device: torch.device, seed: int) -> list[Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator) * 0.05)
        p.grad = torch.randn(shape, device=device, generator=generator)
        params.append(p)
    return params


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU (no host sync inside), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


# --- 1. the CUDA tests ------------------------------------------------------------------------


def run_tests(timeout_s: float) -> dict[str, Any]:
    """``pytest -k cuda`` over the project's tests in a subprocess; its summary line and status."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(tests),
        "-q",
        "-k",
        "cuda",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",  # one process: the CUDA tests share one GPU
    ]
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {
            "status": "timeout",
            "seconds": timeout_s,
            "summary": f"cut off after {timeout_s:.0f} s",
        }
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {
        "status": "passed" if done.returncode == 0 else f"failed (exit {done.returncode})",
        "seconds": round(time.perf_counter() - begin, 1),
        "summary": lines[-1] if lines else done.stderr.strip()[-300:],
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
    }


# --- 2. agreement of every path and format with the CPU reference -----------------------------


def _trajectory(
    device: torch.device, options: dict[str, Any], steps: int = 20
) -> tuple[list[Tensor], list[Tensor]]:
    """The start and the parameters after ``steps`` steps of a small model on ``device``, from
    the same start and gradients (drawn on the CPU) whatever the device."""
    shapes = [(64, 300), (300,), (257, 33), (7,)]
    start = make_params(shapes, torch.device("cpu"), seed=0)
    params = [torch.nn.Parameter(p.detach().clone().to(device)) for p in start]
    opt = AdaBelief(params, lr=1e-2, weight_decay=1e-2, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        opt.step()
    return [p.detach().cpu() for p in start], [p.detach().cpu() for p in params]


def agreement(device: torch.device, path: str, fmt: str) -> dict[str, Any]:
    """One path and format on ``device`` against the CPU reference path in the same format."""
    options = {"state_precision": fmt}
    start, reference = _trajectory(torch.device("cpu"), {**options, **PATHS["single"]})
    _, got = _trajectory(device, {**options, **PATHS[path]})
    moved = max(float((r - s).abs().max()) for r, s in zip(reference, start, strict=True))
    error = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    relative = error / moved if moved else float("inf")
    ok = bool(relative <= TOLERANCE[fmt])  # NaN fails
    return {"path": path, "format": fmt, "relative_error": relative, "ok": ok}


# --- 3. step speed ------------------------------------------------------------------------------


@dataclass
class Candidate:
    key: str
    label: str
    make: Callable[[list[Tensor]], Any]


class _Copy:
    """Not an optimizer: ``dst.copy_(src)`` moving the bytes of a step (the speed limit)."""

    def __init__(self, params: list[Tensor]) -> None:
        floats = BYTES_PER_PARAM * sum(p.numel() for p in params) // 8
        self.src = torch.rand(floats, device=params[0].device)
        self.dst = torch.empty_like(self.src)
        self.state: dict[Any, Any] = {}

    def step(self) -> None:
        self.dst.copy_(self.src)


def candidates() -> tuple[list[Candidate], list[str]]:
    """What to time, baseline first, compiled paths last (their first step compiles)."""
    found = [
        Candidate("copy", "memory copy, same bytes", _Copy),
        Candidate("adam-fused", "torch Adam (fused)", lambda ps: torch.optim.Adam(ps, fused=True)),
        Candidate(
            "adam-foreach", "torch Adam (foreach)", lambda ps: torch.optim.Adam(ps, foreach=True)
        ),
    ]
    notes = []
    try:
        import adabelief_pytorch
    except Exception as error:  # optional: any import failure means "skip it"
        notes.append(f"adabelief-pytorch: skipped ({type(error).__name__}: {error})")
    else:

        def official(ps: list[Tensor]) -> Any:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                return adabelief_pytorch.AdaBelief(ps, print_change_log=False)

        found.append(Candidate("adabelief-pytorch", "adabelief-pytorch 0.2 (official)", official))
    found.append(Candidate("ours-default", "ours: default", lambda ps: AdaBelief(ps)))
    for path in ("single", "foreach", "fused"):
        for fmt in FORMATS:

            def make(ps: list[Tensor], path: str = path, fmt: str = fmt) -> Any:
                return AdaBelief(ps, state_precision=fmt, **PATHS[path])

            found.append(Candidate(f"ours-{path}-{fmt}", f"ours: {path}, {fmt} state", make))
    return found, notes


def state_bytes_per_param(optimizer: Any, numel: int) -> float:
    total = 0
    for entry in getattr(optimizer, "state", {}).values():
        for value in entry.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total / numel


def time_candidate(
    candidate: Candidate,
    params: list[Tensor],
    timer: Timer,
    *,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """Median and minimum ms of ``step()`` after the first and ``warmup`` more steps."""
    device = params[0].device
    numel = sum(p.numel() for p in params)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    optimizer = candidate.make(params)
    first = timer(optimizer.step)
    for _ in range(warmup):
        optimizer.step()
    timer.sync()
    times = [timer(optimizer.step) for _ in range(steps)]
    row: dict[str, Any] = {
        "key": candidate.key,
        "label": candidate.label,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "first_ms": first,
        "state_bytes_per_param": state_bytes_per_param(optimizer, numel),
    }
    if device.type == "cuda":
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del optimizer
    return row


def bench_size(
    name: str,
    numel: int,
    device: torch.device,
    chosen: list[Candidate],
    *,
    warmup: int,
    steps: int,
    deadline: float,
    check: Check,
    save: Callable[[], None],
    log: Callable[[str], None],
) -> None:
    params = make_params(layout(numel), device, seed=0)
    timer = Timer(device)
    rows: list[dict[str, Any]] = []
    for candidate in chosen:
        if time.monotonic() > deadline:
            check.skipped.append(f"{name} {candidate.key}: out of time budget")
            log(f"  {name} {candidate.key}: skipped (out of time budget)")
            continue
        try:
            row = time_candidate(candidate, params, timer, warmup=warmup, steps=steps)
        except Exception as error:  # a failing candidate is a result, not the end of the check
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            row = {"key": candidate.key, "label": candidate.label}
            row["error"] = f"{type(error).__name__}: {message}"[:300]
        row.update(size=name, params=numel, tensors=len(params))
        rows.append(row)
        log(f"  {name} {candidate.key}: {row.get('median_ms', row.get('error'))}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    adam = next(
        (r["median_ms"] for r in rows if r["key"] == "adam-fused" and "median_ms" in r), None
    )
    copy = next((r["median_ms"] for r in rows if r["key"] == "copy" and "median_ms" in r), None)
    for row in rows:
        if "median_ms" in row:
            row["vs_adam_fused"] = row["median_ms"] / adam if adam else None
            row["copy_fraction"] = copy / row["median_ms"] if copy else None
            row["gbs"] = BYTES_PER_PARAM * numel / (row["median_ms"] / 1e3) / 1e9
    check.speed.extend(rows)
    save()
    del params


# --- output ---------------------------------------------------------------------------------------


def markdown(check: Check) -> str:
    """The check as Markdown: machine, tests, agreement, one speed table per size."""
    m = check.machine
    lines = [
        f"GPU check on {m.get('gpu', m['device'])} (torch {m['torch']}, CUDA {m['cuda']})",
        "",
        f"- CUDA tests: {check.tests.get('status', 'not run')}: {check.tests.get('summary', '')}",
    ]
    bad = [a for a in check.agreement if not a["ok"]]
    lines.append(
        f"- agreement with the CPU reference: {len(check.agreement) - len(bad)} of "
        f"{len(check.agreement)} path/format pairs within tolerance"
        + "".join(f"; **{a['path']}/{a['format']}: {a['relative_error']:.3g}**" for a in bad)
    )
    for note in check.skipped:
        lines.append(f"- skipped: {note}")
    for size in dict.fromkeys(r["size"] for r in check.speed):
        rows = [r for r in check.speed if r["size"] == size]
        lines += [
            "",
            f"**{size}** ({rows[0]['params']:,} parameters in {rows[0]['tensors']} tensors)",
            "",
            "| optimizer | ms/step | min | x torch fused Adam | GB/s | % copy | first ms "
            "| state B/p | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['label']} | error: {r['error']} |||||||")
                continue

            def fmt(value: float | None, spec: str) -> str:
                return "-" if value is None else format(value, spec)

            lines.append(
                f"| {r['label']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} "
                f"| {fmt(r.get('vs_adam_fused'), '.2f')} | {r['gbs']:.0f} "
                f"| {fmt(None if r.get('copy_fraction') is None else 100 * r['copy_fraction'], '.0f')} "
                f"| {r['first_ms']:.0f} | {r['state_bytes_per_param']:.2f} "
                f"| {fmt(r.get('peak_extra_mib'), '.0f')} |"
            )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="folder for the JSON and Markdown")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="time for the whole check (default 420)"
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["10M", "100M", "1B"])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try it out")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(machine_info(device))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(asdict(check), indent=2))

    if args.no_tests:
        check.tests = {"status": "not run (--no-tests)", "summary": ""}
    else:
        log("CUDA tests")
        check.tests = run_tests(timeout_s=min(180.0, 0.4 * args.budget_s))
        log(f"  {check.tests['status']}: {check.tests['summary']}")
    save()
    log("agreement with the CPU reference")
    for path in PATHS:
        for fmt in FORMATS:
            if time.monotonic() > deadline:
                check.skipped.append(f"agreement {path}/{fmt}: out of time budget")
                continue
            try:
                result = agreement(device, path, fmt)
            except Exception as error:
                result = {"path": path, "format": fmt, "relative_error": float("nan"), "ok": False}
                result["error"] = f"{type(error).__name__}: {error}"[:300]
            check.agreement.append(result)
            log(f"  {path}/{fmt}: {result}")
    save()
    chosen, notes = candidates()
    check.skipped += notes
    for name in args.sizes:
        log(f"step speed at {name}")
        bench_size(
            name,
            SIZES[name],
            device,
            chosen,
            warmup=args.warmup,
            steps=args.steps,
            deadline=deadline,
            check=check,
            save=save,
            log=log,
        )
    save()
    table = markdown(check)
    (out / "gpu_check.md").write_text(table)
    print(table)
    unchecked = [note for note in check.skipped if note.startswith("agreement")]
    failed = (
        not check.tests.get("status", "").startswith(("passed", "not run"))
        or not all(a["ok"] for a in check.agreement)
        or bool(unchecked)
    )
    print(f"gpu_check: {'FAILED' if failed else 'ok'}; results in {out}/gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
