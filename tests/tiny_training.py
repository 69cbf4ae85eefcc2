"""A tiny regression model, its data and a training loop, shared by the state-format tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

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


def resume_through_checkpoint(
    model: torch.nn.Module, opt: torch.optim.Optimizer, make_opt: Callable[..., Any]
) -> tuple[torch.nn.Module, Any]:
    """A fresh ``tiny_model`` and optimizer (``make_opt(params)``) loaded from ``model`` and
    ``opt`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model(seed=5)
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_opt(resumed.parameters())
    resumed_opt.load_state_dict(saved["opt"])
    return resumed, resumed_opt
