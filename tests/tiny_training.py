"""A tiny regression model, its data and a training loop, shared by the state-format tests."""

from __future__ import annotations

import torch


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 4))


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(128, 64, generator=g), torch.randn(128, 4, generator=g)


def train_tiny(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> float:
    x, y = tiny_data()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return float(loss.detach())
