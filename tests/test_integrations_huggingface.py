"""transformers.Trainer trains a tiny randomly initialised BERT with adabelief.AdaBelief, through
optimizer_cls_and_kwargs and through optimizers=(optimizer, scheduler), and a resumed checkpoint
restores the optimizer state. Nothing is downloaded (HF_HUB_OFFLINE=1, the model is built from a
config in code)."""

from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path
from typing import Any

import pytest
import torch

import adabelief
from _torchvision_compat import import_torchvision

import_torchvision()
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install adabelief[integrations])"
)
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")

from adabelief.integrations.huggingface import optimizer_cls_and_kwargs  # noqa: E402

STEPS = 4


class TinyClassification(torch.utils.data.Dataset):
    """8 random token sequences of length 8 with binary labels."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, 32, (8, 8), generator=generator)
        self.labels = torch.randint(0, 2, (8,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def tiny_bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def training_args(out: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.01,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The Trainer wraps the optimizer in accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def steps_taken(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(state["step"]) for state in optimizer.state.values()}


def test_optimizer_cls_and_kwargs_takes_lr_and_betas_from_the_training_arguments(tmp_path):
    args = training_args(tmp_path, adam_beta1=0.8, adam_beta2=0.99)
    cls, kwargs = optimizer_cls_and_kwargs(args, eps=1e-12, state_precision="bf16")
    assert cls is adabelief.AdaBelief
    assert kwargs == {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-12, "state_precision": "bf16"}

    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TinyClassification(),
        optimizer_cls_and_kwargs=(cls, kwargs),
    )
    trainer.train()
    optimizer = unwrap(trainer.optimizer)
    assert type(optimizer) is adabelief.AdaBelief
    assert steps_taken(optimizer) == {STEPS}
    # The Trainer's groups: weight decay for weights, none for biases and LayerNorm.
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        no_decay = name.endswith("bias") or "LayerNorm" in name
        assert decay_of[id(param)] == (0.0 if no_decay else 0.01), name
    for group in optimizer.param_groups:
        assert group["initial_lr"] == 1e-2  # the scheduler started from args.learning_rate
        assert (group["betas"], group["eps"], group["state_precision"]) == (
            (0.8, 0.99),
            1e-12,
            "bf16",
        )
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_optimizers_tuple_is_used_as_given(tmp_path):
    model = tiny_bert()
    optimizer = adabelief.AdaBelief(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 1, STEPS)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=TinyClassification(),
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    assert unwrap(trainer.optimizer) is optimizer
    assert steps_taken(optimizer) == {STEPS}
    assert scheduler.last_epoch == STEPS


def test_resuming_a_checkpoint_restores_the_optimizer_state(tmp_path):
    def trainer_for(out: Path, callbacks: list[Any] = ()) -> Any:
        args = training_args(out, save_strategy="steps", save_steps=2)
        return transformers.Trainer(
            model=tiny_bert(),
            args=args,
            train_dataset=TinyClassification(),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args),
            callbacks=list(callbacks),
        )

    uninterrupted = trainer_for(tmp_path / "a")
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in saved["state"].values()} == {2}

    loaded: dict[str, Any] = {}

    class CaptureOptimizerAtStart(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            # A copy: a state_dict holds the live state tensors, which training goes on changing.
            loaded.update(copy.deepcopy(unwrap(optimizer).state_dict()))

    resumed = trainer_for(tmp_path / "b", [CaptureOptimizerAtStart()])
    resumed.train(resume_from_checkpoint=str(checkpoint))

    # What the resumed Trainer starts from is the checkpoint's optimizer state, tensor for tensor.
    assert loaded["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        assert state.keys() == loaded["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    # And it ends where the uninterrupted run ended.
    assert steps_taken(unwrap(resumed.optimizer)) == {STEPS}
    for p, q in zip(resumed.model.parameters(), uninterrupted.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_options_are_refused_with_the_field_to_use(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="use learning_rate"):
        optimizer_cls_and_kwargs(args, lr=1e-3)
    with pytest.raises(ValueError, match="use weight_decay"):
        optimizer_cls_and_kwargs(args, weight_decay=0.1)
    with pytest.raises(ValueError, match="use adam_beta1 / adam_beta2"):
        optimizer_cls_and_kwargs(args, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="no argument epsilon"):
        optimizer_cls_and_kwargs(args, epsilon=1e-8)
    with pytest.raises(TypeError, match="TrainingArguments"):
        optimizer_cls_and_kwargs({"learning_rate": 1e-3})


# ---- the step in backward: accumulation and clipping --------------------------------------------


def in_backward_trainer(out: Path, optimizer: Any, **overrides: Any) -> Any:
    """A Trainer of a fresh tiny BERT for 2 optimizer steps of 2 micro-batches each, with
    ``optimizers=(optimizer(model), None)``."""
    settings = dict(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    model = tiny_bert()
    return transformers.Trainer(
        model=model,
        args=training_args(out, **{**settings, **overrides}),
        train_dataset=TinyClassification(),
        optimizers=(optimizer(model), None),
    )


@pytest.mark.slow
def test_step_in_backward_follows_the_trainers_gradient_accumulation(tmp_path):
    """optimizer_cls_and_kwargs(args, step_in_backward=True): the micro-batches that do not end
    an optimizer step only accumulate; the result is the ordinary step's, bit for bit."""
    from adabelief.integrations.huggingface import TrainerAdaBelief

    results = []
    for step_in_backward in (False, True):
        args = training_args(
            tmp_path / str(step_in_backward),
            max_steps=2,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            max_grad_norm=0.0,
        )
        trainer = transformers.Trainer(
            model=tiny_bert(),
            args=args,
            train_dataset=TinyClassification(),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
                args, step_in_backward=step_in_backward
            ),
        )
        trainer.train()
        optimizer = unwrap(trainer.optimizer)
        assert isinstance(optimizer, TrainerAdaBelief) is step_in_backward
        assert steps_taken(optimizer) == {2}
        assert trainer.state.global_step == 2
        results.append([p.detach().clone() for p in trainer.model.parameters()])
    for ordinary, in_backward in zip(*results, strict=True):
        assert torch.equal(ordinary, in_backward)


def test_step_in_backward_refuses_the_trainers_gradient_clipping(tmp_path):
    args = training_args(tmp_path)  # max_grad_norm=1.0, the Trainer's default
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0.*max_grad_norm=0"):
        optimizer_cls_and_kwargs(args, step_in_backward=True)
    args = training_args(tmp_path, max_grad_norm=0.0)
    cls, _ = optimizer_cls_and_kwargs(args, step_in_backward=True)
    assert issubclass(cls, adabelief.AdaBelief)


@pytest.mark.slow
def test_a_ready_in_backward_optimizer_with_accumulation_is_refused_then_follows(tmp_path):
    """optimizers=(AdaBelief(step_in_backward=True), None) with accumulation: the second
    micro-batch's backward raises before any parameter steps twice; after
    follow_gradient_accumulation(optimizer) it trains two steps."""
    from adabelief.backward_step import StepInBackwardError
    from adabelief.integrations.huggingface import follow_gradient_accumulation

    made: list[Any] = []

    def make(model: Any, follow: bool) -> Any:
        optimizer = adabelief.AdaBelief(model.parameters(), lr=1e-2, step_in_backward=True)
        made.append(optimizer)
        return follow_gradient_accumulation(optimizer) if follow else optimizer

    trainer = in_backward_trainer(
        tmp_path / "a", optimizer=lambda m: make(m, False), max_grad_norm=0.0
    )
    with pytest.raises(StepInBackwardError, match=r"second backward pass.*accumulating\(\)"):
        trainer.train()
    assert steps_taken(made[0]) == {1}
    made[0].remove_backward_hooks()
    trainer = in_backward_trainer(
        tmp_path / "b", optimizer=lambda m: make(m, True), max_grad_norm=0.0
    )
    trainer.train()
    assert steps_taken(made[1]) == {2}


@pytest.mark.slow
def test_a_ready_in_backward_optimizer_with_the_default_clipping_is_refused(tmp_path):
    """The Trainer clips to max_grad_norm=1.0 by default: with an in-backward optimizer that
    clipping would find no gradient. Refused, naming the setting, at the first backward (on CPU,
    where the hooks see the Trainer on the stack; elsewhere at step(), after one step)."""
    from adabelief.backward_step import StepInBackwardError

    made: list[Any] = []

    def make(model: Any) -> Any:
        made.append(adabelief.AdaBelief(model.parameters(), lr=1e-2, step_in_backward=True))
        return made[-1]

    trainer = in_backward_trainer(tmp_path, optimizer=make, gradient_accumulation_steps=1)
    with pytest.raises(StepInBackwardError, match=r"max_grad_norm=1\.0\).*max_grad_norm=0"):
        trainer.train()
    assert steps_taken(made[0]) == {0}
