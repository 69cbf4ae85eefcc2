"""Step benchmark: time, bandwidth and memory of one optimizer step, ours against the others.

``adabelief bench ...``, ``python benchmarks/step.py ...`` and
``python -m adabelief.experiments.bench`` run :func:`main`. In one process, over the same parameters and gradients, it times:

* ``torch.optim.Adam`` (for-loop, foreach, fused): the speed to match;
* the other AdaBelief packages where importable: ``adabelief-pytorch`` (the official one, its
  prints suppressed), ``pytorch_optimizer.AdaBelief``, ``torch_optimizer.AdaBelief``;
* every path of ours: single-tensor, foreach, fused, and the default (``fused=None,
  foreach=None``, with the path it chose), and the default with the compressed moments
  (``state_precision="bf16"`` and ``"int8"``).

What each column means:

* ``ms/step``: median wall time of ``optimizer.step()`` over the timed steps (rounds interleave
  the optimizers, so a load change on a shared machine hits them all alike); ``min`` beside it.
* ``GB/s``: the bandwidth-equivalent, 28 bytes per parameter (read p, g, m, s; write p, m, s: the
  minimum traffic of an Adam-like step, float32) divided by the median time. The row ``memory
  copy, same bytes`` times ``dst.copy_(src)`` moving those 28 bytes per parameter, interleaved
  with the optimizers; ``%copy`` is each row's speed relative to it (100%: as fast as a copy).
  The header gives the machine's best copy bandwidth (256 MiB buffers, best of 10).
* ``x fused Adam``: median time over that of ``torch.optim.Adam(fused=True)``.
* ``first ms``: the first ``step()`` of the optimizer in this process (state allocation, and
  for our fused path loading or compiling its kernel if nothing loaded it before).
* ``state B/p``: bytes of optimizer state per parameter (step counts aside), as allocated.
* ``peak MiB``: the peak of the bytes torch's CPU allocator handed out during one step, beyond
  what existed before it (``torch.profiler`` with ``profile_memory=True``, the maximum of its
  "Total Allocated" counter): the temporaries of the step. Memory allocated outside torch (our
  kernel's chunk table: 16 bytes per 32768 elements) is not seen.

The first-step latency of the fused path with a cold and a warm kernel cache is measured in
fresh subprocesses (``ADABELIEF_CACHE_DIR`` pointed at an empty directory, then at the same one).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["PARAM_SETS", "ParamSet", "main"]

#: Bytes moved per float32 parameter by an Adam-like step: read p, g, m, s; write p, m, s.
BYTES_PER_PARAM = 28
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ParamSet:
    """A list of parameter shapes standing for a model."""

    name: str
    description: str
    shapes: tuple[Shape, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


def resnet_shapes(
    widths: Sequence[int], blocks: Sequence[int], head: Sequence[int], in_channels: int = 3
) -> list[Shape]:
    """A ResNet with basic blocks: 7x7 stem, per block two 3x3 convolutions with batch norm
    (weight and bias), 1x1 projections where the width changes, then a dense head."""
    shapes: list[Shape] = [(widths[0], in_channels, 7, 7), (widths[0],), (widths[0],)]
    channels = widths[0]
    for width, count in zip(widths, blocks, strict=True):
        for _ in range(count):
            shapes += [(width, channels, 3, 3), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            if channels != width:
                shapes += [(width, channels, 1, 1), (width,), (width,)]
            channels = width
    for features in head:
        shapes += [(features, channels), (features,)]
        channels = features
    return shapes


def transformer_shapes(vocab: int, context: int, width: int, layers: int) -> list[Shape]:
    """A GPT-style decoder: token and position embeddings, per layer two layer norms, a fused
    QKV projection, the output projection and a 4x MLP (all with biases), a final norm."""
    shapes: list[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width)]
        shapes += [(width,)]
    shapes += [(width,), (width,)]
    return shapes


def _set(name: str, description: str, shapes: Sequence[Shape]) -> ParamSet:
    return ParamSet(name, description, tuple(shapes))


#: The parameter sets; ``resnet-18.9M`` is the headline one.
PARAM_SETS: dict[str, ParamSet] = {
    s.name: s
    for s in [
        _set(
            "mlp-10K", "MLP 64-64-64-10 (tiny)", [(64, 64), (64,), (64, 64), (64,), (10, 64), (10,)]
        ),
        _set(
            "cnn-100K",
            "small ResNet, widths 16-32-64, one block each",
            resnet_shapes([16, 32, 64], [1, 1, 1], [10]),
        ),
        _set(
            "transformer-1M",
            "GPT-style, width 128, 4 layers, vocab 1000 (many small tensors)",
            transformer_shapes(1000, 128, 128, 4),
        ),
        _set("mlp-1M", "one 1024x1024 layer and its bias (few tensors)", [(1024, 1024), (1024,)]),
        _set(
            "resnet-18.9M",
            "ResNet-34 layout, widths 64-128-256-448, head 448-1024-100",
            resnet_shapes([64, 128, 256, 448], [3, 4, 6, 3], [1024, 100]),
        ),
        _set(
            "transformer-100M",
            "GPT-style, width 768, 12 layers, vocab 16000, context 1024",
            transformer_shapes(16000, 1024, 768, 12),
        ),
        _set("large-100M", "four 5000x5000 matrices (few large tensors)", [(5000, 5000)] * 4),
    ]
}
HEADLINE = "resnet-18.9M"
#: Sets this large get fewer timed steps by default.
LARGE_SET = 50_000_000
DEFAULT_SETS = ("mlp-10K", "cnn-100K", "transformer-1M", "mlp-1M", HEADLINE, "transformer-100M")
QUICK_SETS = ("transformer-1M", HEADLINE)
#: Optimizers timed on the sweep sets (the headline set times all of them).
SWEEP_CANDIDATES = (
    "copy",
    "adam-fused",
    "adam-foreach",
    "adabelief-pytorch",
    "ours-single",
    "ours-foreach",
    "ours-fused",
    "ours-default",
    "ours-bf16",
    "ours-int8",
)


@dataclass
class Candidate:
    """An optimizer to time: ``make(params)`` builds it."""

    key: str
    label: str
    make: Callable[[list[Tensor]], Any]


def _official(params: list[Tensor]) -> torch.optim.Optimizer:
    import adabelief_pytorch

    with contextlib.redirect_stdout(io.StringIO()):
        return adabelief_pytorch.AdaBelief(params, print_change_log=False)


def _pytorch_optimizer(params: list[Tensor]) -> torch.optim.Optimizer:
    import pytorch_optimizer

    return pytorch_optimizer.AdaBelief(params)


def _torch_optimizer(params: list[Tensor]) -> torch.optim.Optimizer:
    import torch_optimizer

    return torch_optimizer.AdaBelief(params)


def _ours(**options: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        from adabelief import AdaBelief

        return AdaBelief(params, **options)

    return make


class _Copy:
    """Not an optimizer: ``dst.copy_(src)`` moving the bytes of a step (14 read + 14 written per
    parameter), the speed limit of any step on this machine."""

    def __init__(self, params: list[Tensor]) -> None:
        floats = BYTES_PER_PARAM * sum(p.numel() for p in params) // 8
        self.src = torch.rand(floats)
        self.dst = torch.empty_like(self.src)

    def step(self) -> None:
        self.dst.copy_(self.src)


def all_candidates(with_compiled: bool) -> tuple[list[Candidate], list[str]]:
    """The optimizers to time, and a note for each optional one that cannot be imported."""

    def adam(**options: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        return lambda params: torch.optim.Adam(params, **options)

    found = [
        Candidate("copy", "memory copy, same bytes", _Copy),
        Candidate("adam-loop", "torch Adam (for-loop)", adam(foreach=False)),
        Candidate("adam-foreach", "torch Adam (foreach)", adam(foreach=True)),
        Candidate("adam-fused", "torch Adam (fused)", adam(fused=True)),
    ]
    notes = []
    for key, label, module, make in [
        ("adabelief-pytorch", "adabelief-pytorch 0.2 (official)", "adabelief_pytorch", _official),
        (
            "pytorch-optimizer",
            "pytorch_optimizer.AdaBelief",
            "pytorch_optimizer",
            _pytorch_optimizer,
        ),
        ("torch-optimizer", "torch_optimizer.AdaBelief", "torch_optimizer", _torch_optimizer),
    ]:
        try:
            __import__(module)
        except Exception as error:  # optional: any import failure means "skip it"
            notes.append(f"{label}: skipped ({type(error).__name__}: {error})")
            continue
        found.append(Candidate(key, label, make))
    found += [
        Candidate("ours-single", "ours: single-tensor", _ours(foreach=False, fused=False)),
        Candidate("ours-foreach", "ours: foreach", _ours(foreach=True, fused=False)),
        Candidate("ours-fused", "ours: fused", _ours(fused=True)),
        Candidate("ours-default", "ours: default", _ours()),
        Candidate("ours-bf16", "ours: default, bf16 state", _ours(state_precision="bf16")),
        Candidate("ours-int8", "ours: default, int8 state", _ours(state_precision="int8")),
    ]
    if with_compiled:
        # fused=True with capturable=True: the compiled tensor-math path (CUDA's) on CPU.
        found.append(
            Candidate(
                "ours-compiled", "ours: compiled (CUDA path)", _ours(fused=True, capturable=True)
            )
        )
    return found, notes


@dataclass
class Result:
    """One optimizer on one parameter set (times in milliseconds)."""

    key: str
    label: str
    median_ms: float
    min_ms: float
    samples: int
    gbs: float
    copy_fraction: float
    vs_adam_fused: float | None
    vs_adam_fused_min: float | None
    first_step_ms: float
    peak_extra_bytes: int | None
    state_bytes_per_param: float | None = None
    note: str = ""


@dataclass
class SetReport:
    name: str
    description: str
    params: int
    tensors: int
    mode: str
    rounds: int
    steps_per_round: int
    results: list[Result] = field(default_factory=list)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """The machine's copy bandwidth in GB/s: ``dst.copy_(src)`` on ``nbytes`` float32 buffers,
    counting the bytes read and written, best of ``repeats`` (what the machine can do)."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times) / 1e9


def _available_memory() -> float:
    """Bytes of memory available (``MemAvailable`` of /proc/meminfo; unknown: no limit)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    return math.inf


def make_params(pset: ParamSet, seed: int = 0) -> list[Tensor]:
    """float32 parameters of ``pset`` with random gradients."""
    generator = torch.Generator().manual_seed(seed)
    params: list[Tensor] = []
    for shape in pset.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.05)
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    return params


def _refresh_grads(params: list[Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        assert p.grad is not None
        p.grad.normal_(generator=generator)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ log lines on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_bytes(optimizer: Any) -> int | None:
    """Peak bytes allocated by torch's CPU allocator during one ``step()`` (None if the profiler
    reports no memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp, _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            optimizer.step()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    totals = [
        e["args"].get("Total Allocated", 0)
        for e in events
        if e.get("name") == "[memory]" and "args" in e
    ]
    return max([0, *totals]) if events else None


def _default_choice(optimizer: Any) -> str:
    from adabelief.kernels.dispatch import choose_path

    group = optimizer.param_groups[0]
    return choose_path(list(group["params"]), group)


def state_bytes_per_param(optimizer: Any, numel: int) -> float | None:
    """Bytes of the optimizer's per-parameter state tensors (0-dim step counts aside) per
    parameter; None for what is not an optimizer."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict) or not numel:
        return None
    total = 0
    for entry in state.values():
        for value in entry.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total / numel


def bench_set(
    pset: ParamSet,
    candidates: list[Candidate],
    *,
    rounds: int,
    steps: int,
    warmup: int,
    memory: bool,
    interleave_budget: int,
    bandwidth: float,
    log: Callable[[str], None],
) -> SetReport:
    """Time every candidate on ``pset``: interleaved rounds when all their states fit in
    ``interleave_budget`` bytes, else one optimizer after the other."""
    params = make_params(pset)
    # Bytes per parameter held at once when interleaving: float32 state (m, s) per optimizer,
    # the copy's two buffers, and slack for the temporaries of a step.
    per_param = sum(BYTES_PER_PARAM if c.key == "copy" else 8 for c in candidates) + 8
    interleave = per_param * pset.numel <= min(interleave_budget, 0.6 * _available_memory())
    report = SetReport(
        pset.name,
        pset.description,
        pset.numel,
        pset.tensors,
        "interleaved" if interleave else "sequential",
        rounds,
        steps,
    )
    times: dict[str, list[float]] = {c.key: [] for c in candidates}
    first: dict[str, float] = {}
    state_bytes: dict[str, float | None] = {}
    peaks: dict[str, int | None] = {}
    notes: dict[str, str] = {}

    def start(c: Candidate) -> Any:
        optimizer = c.make(params)
        begin = time.perf_counter()
        optimizer.step()
        first[c.key] = (time.perf_counter() - begin) * 1e3
        for _ in range(warmup):
            optimizer.step()
        state_bytes[c.key] = state_bytes_per_param(optimizer, pset.numel)
        if c.key in ("ours-default", "ours-bf16", "ours-int8"):
            notes[c.key] = f"-> {_default_choice(optimizer)}"
        return optimizer

    def run(c: Candidate, optimizer: Any) -> None:
        for _ in range(steps):
            begin = time.perf_counter()
            optimizer.step()
            times[c.key].append(time.perf_counter() - begin)

    def finish(c: Candidate, optimizer: Any) -> None:
        peaks[c.key] = step_peak_bytes(optimizer) if memory and c.key != "copy" else None

    if interleave:
        optimizers = {c.key: start(c) for c in candidates}
        for r in range(rounds):
            _refresh_grads(params, r + 1)
            order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
            for c in order:
                run(c, optimizers[c.key])
        for c in candidates:
            finish(c, optimizers[c.key])
        del optimizers
    else:
        for c in candidates:
            log(f"  {pset.name}: {c.label}")
            optimizer = start(c)
            for r in range(rounds):
                _refresh_grads(params, r + 1)
                run(c, optimizer)
            finish(c, optimizer)
            del optimizer
            gc.collect()

    adam = times.get("adam-fused")
    adam_ms = statistics.median(adam) * 1e3 if adam else None
    adam_min_ms = min(adam) * 1e3 if adam else None
    copy = times.get("copy")
    copy_gbs = BYTES_PER_PARAM * pset.numel / statistics.median(copy) / 1e9 if copy else bandwidth
    for c in candidates:
        median_ms = statistics.median(times[c.key]) * 1e3
        gbs = BYTES_PER_PARAM * pset.numel / (median_ms / 1e3) / 1e9
        report.results.append(
            Result(
                key=c.key,
                label=c.label,
                median_ms=median_ms,
                min_ms=min(times[c.key]) * 1e3,
                samples=len(times[c.key]),
                gbs=gbs,
                copy_fraction=gbs / copy_gbs,
                vs_adam_fused=median_ms / adam_ms if adam_ms else None,
                vs_adam_fused_min=min(times[c.key]) * 1e3 / adam_min_ms if adam_min_ms else None,
                first_step_ms=first[c.key],
                peak_extra_bytes=peaks.get(c.key),
                state_bytes_per_param=state_bytes.get(c.key),
                note=notes.get(c.key, ""),
            )
        )
    return report


def format_set(report: SetReport) -> str:
    """A plain-text table of one set."""
    lines = [
        f"{report.name}: {report.params:,} float32 parameters in {report.tensors} tensors "
        f"({report.description}; {report.mode}, {report.rounds}x{report.steps_per_round} "
        "timed steps)",
        f"{'optimizer':34} {'ms/step':>8} {'min':>8} {'GB/s':>6} {'%copy':>6} "
        f"{'x Adam-fused':>12} {'(min)':>6} {'first ms':>9} {'state B/p':>9} {'peak MiB':>9}  "
        "note",
    ]
    for r in report.results:
        ratio = f"{r.vs_adam_fused:.2f}" if r.vs_adam_fused is not None else "-"
        ratio_min = f"{r.vs_adam_fused_min:.2f}" if r.vs_adam_fused_min is not None else "-"
        peak = f"{r.peak_extra_bytes / 2**20:.1f}" if r.peak_extra_bytes is not None else "-"
        state = f"{r.state_bytes_per_param:.2f}" if r.state_bytes_per_param is not None else "-"
        lines.append(
            f"{r.label:34} {r.median_ms:8.2f} {r.min_ms:8.2f} {r.gbs:6.1f} "
            f"{100 * r.copy_fraction:5.0f}% {ratio:>12} {ratio_min:>6} {r.first_step_ms:9.1f} "
            f"{state:>9} {peak:>9}  {r.note}"
        )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch threads and versions."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- first-step latency in fresh processes ------------------------------------------------------


def _probe(which: str, set_name: str) -> None:
    """Subprocess side: time construction and the first two steps; print JSON."""
    import adabelief
    from adabelief.kernels import cpu

    params = make_params(PARAM_SETS[set_name])
    imported = time.perf_counter()
    if which == "adam-fused":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, fused=True)
    else:
        optimizer = adabelief.AdaBelief(params, fused=True)
    built = time.perf_counter()
    optimizer.step()
    first = time.perf_counter()
    optimizer.step()
    second = time.perf_counter()
    print(
        json.dumps(
            {
                "construct_s": built - imported,
                "first_step_s": first - built,
                "second_step_s": second - first,
                "kernel_builds": cpu.builds,
            }
        )
    )


def first_step_latency(set_name: str, log: Callable[[str], None]) -> dict[str, Any]:
    """First-step latency of our fused path with a cold then a warm kernel cache, and of torch's
    fused Adam, each in a fresh process."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="adabelief-bench-cache-") as cache:
        runs = [("ours-fused cold cache", "ours-fused"), ("ours-fused warm cache", "ours-fused")]
        runs.append(("torch Adam (fused)", "adam-fused"))
        for label, which in runs:
            env = dict(os.environ, ADABELIEF_CACHE_DIR=cache)
            command = [
                sys.executable,
                "-m",
                "adabelief.experiments.bench",
                "--probe",
                which,
                set_name,
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode != 0:
                out[label] = {"error": done.stderr.strip()[-500:]}
            else:
                out[label] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"  {label}: {out[label]}")
    return out


def format_latency(latency: dict[str, Any], set_name: str) -> str:
    lines = [
        f"First step in a fresh process ({set_name}; kernel cache in a new directory, then reused)",
        f"{'':26} {'construct s':>12} {'1st step s':>11} {'2nd step s':>11} kernel builds",
    ]
    for label, r in latency.items():
        if "error" in r:
            lines.append(f"{label:26} error: {r['error']}")
            continue
        lines.append(
            f"{label:26} {r['construct_s']:12.3f} {r['first_step_s']:11.3f} "
            f"{r['second_step_s']:11.4f} {r['kernel_builds']:6d}"
        )
    return "\n".join(lines)


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _check_json_path(parser: argparse.ArgumentParser, path: str) -> None:
    """Refuse, before anything is timed, a ``--json`` path that cannot be written."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        parser.error(f"--json {path}: is a directory")
    if not os.path.isdir(folder):
        parser.error(f"--json {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (
        os.path.exists(target) and not os.access(target, os.W_OK)
    ):
        parser.error(f"--json {path}: not writable")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adabelief bench",
        description="Time one optimizer step of AdaBelief (every path of ours and the other "
        "packages) against torch.optim.Adam, over the same parameters.",
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=sorted(PARAM_SETS),
        help=f"parameter sets (default: {' '.join(DEFAULT_SETS)}; --quick: {' '.join(QUICK_SETS)})",
    )
    parser.add_argument(
        "--rounds",
        type=_count(1),
        help="interleaved rounds (default 6; quick or 50M+ parameters: 3)",
    )
    parser.add_argument(
        "--steps",
        type=_count(1),
        help="timed steps per round (default 5; quick 3; 50M+ parameters: 2)",
    )
    parser.add_argument(
        "--warmup", type=_count(0), help="untimed steps after the first (default 3; 50M+: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer sets and steps (~30 s)")
    parser.add_argument(
        "--all-candidates",
        action="store_true",
        help="time every optimizer on every set (default: all on the headline set only)",
    )
    parser.add_argument(
        "--with-compiled",
        action="store_true",
        help="also time our torch.compile path (the CUDA path) on CPU; compiles for minutes",
    )
    parser.add_argument(
        "--threads", type=_count(1), help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    parser.add_argument(
        "--no-latency", action="store_true", help="skip the fresh-process first-step latency"
    )
    parser.add_argument(
        "--interleave-budget-gib",
        type=_positive_float,
        default=12.0,
        help="interleave the optimizers of a set when all their states fit in this and in 60%% "
        "of the available memory (default 12 GiB); else time them one after the other",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--probe", nargs=2, metavar=("WHICH", "SET"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 when the results cannot be written)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json:
        _check_json_path(parser, args.json)
    if args.probe:
        _probe(args.probe[0], args.probe[1])
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = args.sets or list(QUICK_SETS if args.quick else DEFAULT_SETS)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    machine = machine_info()
    bandwidth = copy_bandwidth()
    candidates, notes = all_candidates(args.with_compiled)
    print(
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"torch {machine['torch']} with {machine['torch_threads']} threads"
    )
    print(f"Copy bandwidth: {bandwidth:.1f} GB/s (dst.copy_(src), 256 MiB float32, read+write)")
    for note in notes:
        print(f"Note: {note}")
    print()
    reports = []
    for name in sets:
        pset = PARAM_SETS[name]
        chosen = candidates
        if name != HEADLINE and not args.all_candidates:
            chosen = [c for c in candidates if c.key in SWEEP_CANDIDATES]
        large = pset.numel >= LARGE_SET
        rounds = args.rounds or (3 if args.quick or large else 6)
        steps = args.steps or (2 if large else 3 if args.quick else 5)
        warmup = args.warmup if args.warmup is not None else (1 if large else 3)
        log(f"{name}: {len(chosen)} optimizers, {pset.numel:,} parameters")
        report = bench_set(
            pset,
            chosen,
            rounds=rounds,
            steps=steps,
            warmup=warmup,
            memory=not args.no_memory,
            interleave_budget=int(args.interleave_budget_gib * 2**30),
            bandwidth=bandwidth,
            log=log,
        )
        reports.append(report)
        print(format_set(report))
        print(flush=True)
        gc.collect()
    latency: dict[str, Any] = {}
    if not args.no_latency:
        log("first-step latency in fresh processes")
        latency = first_step_latency(HEADLINE, log)
        print(format_latency(latency, HEADLINE))
    if args.json:
        try:
            _write_json(
                args.json,
                {
                    "argv": sys.argv if argv is None else argv,
                    "machine": machine,
                    "copy_bandwidth_gbs": bandwidth,
                    "bytes_per_param": BYTES_PER_PARAM,
                    "notes": notes,
                    "sets": [asdict(r) for r in reports],
                    "first_step_latency": latency,
                },
            )
        except OSError as error:
            print(f"adabelief bench: cannot write --json {args.json}: {error}", file=sys.stderr)
            return 2
    return 0


def _write_json(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` atomically (a finished benchmark is never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(results, f, indent=2)
    os.replace(f.name, path)


if __name__ == "__main__":
    sys.exit(main())
