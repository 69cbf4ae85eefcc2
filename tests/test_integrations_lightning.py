"""Lightning trains with adabelief.AdaBelief from configure_optimizers and from
LightningCLI --optimizer adabelief.AdaBelief (in process, on CPU, a tiny model, a few steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import adabelief
from _torchvision_compat import import_torchvision

import_torchvision()
L = pytest.importorskip(
    "lightning.pytorch", reason="lightning is not installed (pip install adabelief[integrations])"
)
pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

STEPS = 3


def tiny_data() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Regression(L.LightningModule):
    """A linear regression; ``configure_optimizers`` is what a user writes (or what LightningCLI
    replaces with ``--optimizer``)."""

    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return tiny_data()

    def configure_optimizers(self) -> Any:
        optimizer = adabelief.AdaBelief(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def trainer_settings(root: Path) -> dict[str, Any]:
    return dict(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def steps_taken(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(state["step"]) for state in optimizer.state.values()}


def test_configure_optimizers_with_a_scheduler(tmp_path):
    model = Regression(lr=1e-2, weight_decay=1e-3)
    before = model.layer.weight.detach().clone()
    trainer = L.Trainer(**trainer_settings(tmp_path))
    trainer.fit(model)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is adabelief.AdaBelief
    assert steps_taken(optimizer) == {STEPS}
    # The step-wise scheduler drove the group's lr: 1e-2 * 0.5**3.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**STEPS)
    assert not torch.equal(model.layer.weight, before)


class RegressionForCLI(Regression):
    """With --optimizer, LightningCLI builds the optimizer from the command line."""

    def configure_optimizers(self) -> Any:  # replaced by LightningCLI
        raise AssertionError("LightningCLI should have replaced configure_optimizers")


def test_lightning_cli_optimizer_by_class_path(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # the command line is args=, not pytest's
    settings = trainer_settings(tmp_path)
    args = ["fit", "--optimizer", "adabelief.AdaBelief", "--optimizer.lr", "0.003"]
    args += ["--optimizer.eps", "1e-12", "--optimizer.rectify", "false"]
    args += ["--optimizer.state_precision", "bf16"]
    for key, value in settings.items():
        args += [f"--trainer.{key}", str(value)]
    cli = LightningCLI(RegressionForCLI, args=args, save_config_kwargs={"overwrite": True})
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is adabelief.AdaBelief
    group = optimizer.param_groups[0]
    assert (group["lr"], group["eps"], group["rectify"], group["state_precision"]) == (
        0.003,
        1e-12,
        False,
        "bf16",
    )
    assert steps_taken(optimizer) == {STEPS}


def test_lightning_cli_refuses_a_bad_value(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])
    args = ["fit", "--optimizer", "adabelief.AdaBelief", "--optimizer.lr", "-1"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"]
    with pytest.raises(ValueError, match="Invalid lr"):
        LightningCLI(RegressionForCLI, args=args, save_config_kwargs={"overwrite": True})
