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


# ---- the step in backward: accumulation and clipping --------------------------------------------


class InBackwardRegression(Regression):
    """Regression whose AdaBelief steps in backward (or not), with its step-wise scheduler."""

    def __init__(self, step_in_backward: bool = True) -> None:
        torch.manual_seed(0)  # the same weights for either way of stepping
        super().__init__(lr=1e-2)
        self.step_in_backward = step_in_backward
        self.made: list[adabelief.AdaBelief] = []

    def configure_optimizers(self) -> Any:
        optimizer = adabelief.AdaBelief(
            self.parameters(), lr=self.hparams.lr, step_in_backward=self.step_in_backward
        )
        self.made.append(optimizer)
        return optimizer


def _fit(root: Path, model: Regression, callbacks: list[Any] = (), **overrides: Any) -> Any:
    settings = {**trainer_settings(root), **overrides}
    trainer = L.Trainer(**settings, callbacks=list(callbacks))
    trainer.fit(model)
    return trainer


@pytest.mark.slow
def test_step_in_backward_callback_follows_accumulate_grad_batches(tmp_path):
    """With the StepInBackward callback, accumulate_grad_batches=2 trains as the ordinary step
    does, bit for bit: one step per two micro-batches."""
    from adabelief.integrations.lightning import StepInBackward

    ordinary, in_backward = InBackwardRegression(False), InBackwardRegression(True)
    _fit(tmp_path / "a", ordinary, accumulate_grad_batches=2)
    trainer = _fit(tmp_path / "b", in_backward, [StepInBackward()], accumulate_grad_batches=2)
    assert trainer.global_step == STEPS
    assert steps_taken(in_backward.made[0]) == steps_taken(ordinary.made[0]) == {STEPS}
    for p, q in zip(ordinary.parameters(), in_backward.parameters(), strict=True):
        assert torch.equal(p, q)
    assert in_backward.made[0]._backward.accumulate_when is None  # released at the end


@pytest.mark.slow
def test_accumulate_grad_batches_without_the_callback_is_refused(tmp_path):
    from adabelief.backward_step import StepInBackwardError

    model = InBackwardRegression(True)
    with pytest.raises(StepInBackwardError, match=r"second backward pass.*frameworks\.md"):
        _fit(tmp_path, model, accumulate_grad_batches=2)
    assert steps_taken(model.made[0]) == {1}  # never twice in one optimizer step


@pytest.mark.slow
@pytest.mark.parametrize("with_callback", [False, True], ids=["bare", "callback"])
def test_gradient_clip_val_is_refused_before_any_step(tmp_path, with_callback):
    """Lightning would clip the global norm after backward, where no gradient is left: refused
    before the first in-backward step, by the callback or by step(closure) itself."""
    from adabelief.backward_step import StepInBackwardError
    from adabelief.integrations.lightning import StepInBackward

    model = InBackwardRegression(True)
    callbacks = [StepInBackward()] if with_callback else []
    with pytest.raises(StepInBackwardError, match=r"gradient_clip_val=1\.0.*gradient_clip_val"):
        _fit(tmp_path, model, callbacks, gradient_clip_val=1.0)
    assert steps_taken(model.made[0]) == {0}


@pytest.mark.slow
def test_the_issues_lightning_run_is_refused_before_any_second_step(tmp_path):
    """accumulate_grad_batches=2, gradient_clip_val=1.0, max_steps=2: this once took 4 steps
    against global_step 2 and clipped nothing. Now the clipping is refused before any step: by
    the callback when training starts, or without it by the first micro-batch's backward (on
    CPU, where its hooks see Lightning's loop on the stack)."""
    from adabelief.backward_step import StepInBackwardError
    from adabelief.integrations.lightning import StepInBackward

    for callbacks in ([], [StepInBackward()]):
        model = InBackwardRegression(True)
        with pytest.raises(StepInBackwardError, match="gradient_clip_val"):
            _fit(tmp_path, model, callbacks, accumulate_grad_batches=2, gradient_clip_val=1.0,
                 max_steps=2)  # fmt: skip
        assert steps_taken(model.made[0]) == {0}
