"""Choose the int4 state format's block size and code maps by measurement.

Trains a small MLP and a small CNN (teacher-student classification on fixed synthetic data) with
float32 state, takes the real moments (``exp_avg`` and the belief ``exp_avg_var``) of their large
weights at several steps, and for each candidate int4 format reports the relative error of the
update ``m / (sqrt(s) + eps)`` after one encode/decode; then trains each candidate over a few
seeds and reports the final loss against float32 state.

    python benchmarks/int4_code_map.py [--seeds 3] [--steps 300] [--tasks mlp cnn]

Candidates: block size 64 or 128; ``exp_avg`` levels ``(k/7)**p``, p = 1 (linear) or 2; belief
levels ``(k/15)**p``, p = 2 (linear in the square root, int8's map), 4 or 8 (companded).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs


def variant(block: int, signed_power: int, belief_power: int) -> cs.StorageFormat:
    cls = type(
        "Candidate",
        (type(cs.INT4),),
        dict(block_size=block, signed_power=signed_power, belief_power=belief_power),
    )
    return cls()


def task(kind: str, seed: int):
    g = torch.Generator().manual_seed(100)
    if kind == "mlp":
        x = torch.randn(512, 64, generator=g)
        teacher = torch.randn(64, 10, generator=g)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
    else:
        x = torch.randn(256, 3, 16, 16, generator=g)
        teacher = torch.randn(3 * 16 * 16, 10, generator=g) / 16
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(64 * 16, 10),
        )
    y = (x.reshape(len(x), -1) @ teacher).argmax(1)
    return model, x, y


def train(kind: str, seed: int, steps: int, precision: str, snapshots=()):
    model, x, y = task(kind, seed)
    opt = AdaBelief(model.parameters(), lr=1e-3, state_precision=precision)
    taken = []
    loss = torch.tensor(0.0)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if step in snapshots:
            for p in model.parameters():
                if cs.INT4.applies_to(p):
                    s = opt.state[p]
                    taken.append((s["exp_avg"].clone(), s["exp_avg_var"].clone()))
    return float(loss.detach()), taken


def update_error(fmt: cs.StorageFormat, moments, eps: float = 1e-16) -> float:
    errors = []
    for step, (m, s) in enumerate(moments):
        param = torch.zeros_like(m)
        stored = [fmt.zeros(param, False), fmt.zeros(param, True)]
        cs.encode_(stored, [m, s], step + 1)
        m2, s2 = (x.decode() for x in stored)
        exact = m / (s.sqrt() + eps)
        errors.append(float((m2 / (s2.sqrt() + eps) - exact).norm() / exact.norm()))
    return statistics.mean(errors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    candidates = {
        (b, sp, bp): variant(b, sp, bp)
        for b, sp, bp in itertools.product((64, 128), (1, 2), (2, 4, 8))
    }
    snapshots = (10, args.steps // 3, args.steps)
    for kind in args.tasks:
        base = [train(kind, seed, args.steps, "fp32", snapshots) for seed in range(args.seeds)]
        moments = [m for _, taken in base for m in taken]
        fp32 = [loss for loss, _ in base]
        s = torch.cat([v.reshape(-1) for _, v in moments])
        q = torch.quantile(
            s[torch.randperm(len(s))[:100_000]].double(),
            torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64),
        )
        print(
            f"\n{kind}: {len(moments)} belief tensors; quantiles 1/50/99% {q.tolist()}, "
            f"max {float(s.max()):.3g}; fp32-state final loss {statistics.mean(fp32):.4f}"
        )
        print(
            f"{'block':>5} {'m map':>6} {'s map':>6} {'update rel err':>15} {'final loss':>11}"
            f" {'/ fp32':>7}"
        )
        for (b, sp, bp), fmt in candidates.items():
            error = update_error(fmt, moments)
            cs.FORMATS["int4"] = fmt
            try:
                losses = [train(kind, seed, args.steps, "int4")[0] for seed in range(args.seeds)]
            finally:
                cs.FORMATS["int4"] = cs.INT4
            ratio = statistics.mean(a / b_ for a, b_ in zip(losses, fp32, strict=True))
            print(
                f"{b:>5} {f'^{sp}':>6} {f'^{bp}':>6} {error:>15.4f} "
                f"{statistics.mean(losses):>11.4f} {ratio:>7.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
