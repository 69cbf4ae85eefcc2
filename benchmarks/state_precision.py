"""Quality and size of the compressed optimizer state (``state_precision``) against fp32.

Run the runner's classification and language-model tasks with the three formats, then this::

    adabelief run classify lm --quick --seeds 5 \
        --optimizers adabelief,adabelief_bf16,adabelief_int8 --out runs/state
    python benchmarks/state_precision.py runs/state

It prints, per task, each format's final metrics (mean and std over seeds) with the paired
difference to fp32 over the same seeds, and the bytes of optimizer state per parameter that each
format takes on the runner's models and on a large layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from scipy import stats

from adabelief import AdaBelief
from adabelief.experiments.models import DigitsCNN, LSTMLanguageModel

VARIANTS = {"adabelief": "fp32", "adabelief_bf16": "bf16", "adabelief_int8": "int8"}
METRICS = {"classify": ("best_test_acc", "final_test_acc"), "lm": ("test_ppl", "best_val_ppl")}


def quality_table(results: list[dict]) -> list[str]:
    """Markdown rows: format, metric, mean ± std, paired difference to fp32 and its p-value."""
    rows = [
        "| task / experiment | state | metric | mean ± std | paired diff vs fp32 | t-test p |",
        "|---|---|---|---|---|---|",
    ]
    runs: dict[tuple[str, str, str], dict[int, dict]] = {}
    for record in results:
        if record["optimizer"] in VARIANTS and record["task"] in METRICS:
            key = (record["task"], record["experiment"], record["optimizer"])
            runs.setdefault(key, {})[record["seed"]] = record["metrics"]
    for task, experiment, optimizer in sorted(runs):
        baseline = runs.get((task, experiment, "adabelief"), {})
        for metric in METRICS[task]:
            by_seed = runs[(task, experiment, optimizer)]
            values = [m[metric] for m in by_seed.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            seeds = sorted(set(by_seed) & set(baseline))
            diff, p = "", ""
            if optimizer != "adabelief" and len(seeds) > 1:
                ours = [by_seed[s][metric] for s in seeds]
                base = [baseline[s][metric] for s in seeds]
                delta = [a - b for a, b in zip(ours, base, strict=True)]
                diff = f"{statistics.mean(delta):+.4f} ± {statistics.stdev(delta):.4f}"
                p = "identical" if not any(delta) else f"{stats.ttest_rel(ours, base).pvalue:.3f}"
            rows.append(
                f"| {task} / {experiment} | {VARIANTS[optimizer]} | {metric} | "
                f"{statistics.mean(values):.4f} ± {spread:.4f} | {diff} | {p} |"
            )
    return rows


def state_bytes_per_parameter(model: torch.nn.Module, precision: str) -> float:
    """Bytes of moments (and int8/int4 scales) per parameter after one step, ``step`` excluded."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdaBelief(params, state_precision=precision)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    total = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key != "step"
    )
    return total / sum(p.numel() for p in params)


def size_table() -> list[str]:
    models = {
        "classify: DigitsCNN (quick)": lambda: DigitsCNN(),
        "lm: 1-layer char LSTM (quick, vocab 100)": lambda: LSTMLanguageModel(100, 64, 128, 1),
        "a 4096x4096 linear layer": lambda: torch.nn.Linear(4096, 4096),
    }
    formats = ("fp32", "bf16", "int8", "int4")
    rows = [f"| model | parameters | {' | '.join(formats)} |", "|---|---|" + "---|" * len(formats)]
    for name, build in models.items():
        torch.manual_seed(0)
        model = build()
        count = sum(p.numel() for p in model.parameters())
        sizes = [state_bytes_per_parameter(model, f) for f in formats]
        rows.append(f"| {name} | {count:,} | " + " | ".join(f"{s:.2f}" for s in sizes) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="an `adabelief run` output folder")
    args = parser.parse_args(argv)
    results_file = args.runs / "results.json"
    if not results_file.is_file():
        print(f"error: {results_file} not found (run `adabelief run` first)", file=sys.stderr)
        return 2
    results = json.loads(results_file.read_text())
    print("\n".join(quality_table(results)))
    print()
    print("Optimizer state, bytes per parameter:\n")
    print("\n".join(size_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
