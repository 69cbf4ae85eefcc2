"""The optimizer registry and the presets."""

from __future__ import annotations

import pytest
import torch

from adabelief import AdaBelief
from adabelief.experiments.presets import PRESETS, get_preset
from adabelief.experiments.registry import (
    DEFAULT_OPTIMIZERS,
    OptimizerEntry,
    UnknownOptimizerError,
    available_optimizers,
    check_optimizer_names,
    create_optimizer,
    get_entry,
    known_optimizers,
    register_optimizer,
)
from adabelief.experiments.training import model_for_optimizer


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_default_optimizers_build_the_expected_classes() -> None:
    expected = {
        "adabelief": AdaBelief,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "radam": torch.optim.RAdam,
    }
    assert set(DEFAULT_OPTIMIZERS) == set(expected)
    for name, cls in expected.items():
        assert type(create_optimizer(name, _params(), lr=0.01)) is cls


def test_sgd_defaults_to_momentum_and_can_be_overridden() -> None:
    assert create_optimizer("sgd", _params(), lr=0.1).defaults["momentum"] == 0.9
    assert create_optimizer("SGD", _params(), lr=0.1, momentum=0.0).defaults["momentum"] == 0.0


def test_betas_from_json_lists_become_tuples() -> None:
    optimizer = create_optimizer("adabelief", _params(), lr=1e-3, betas=[0.5, 0.999])
    assert optimizer.defaults["betas"] == (0.5, 0.999)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownOptimizerError) as info:
        create_optimizer("adagradx", _params())
    message = str(info.value)
    for name in DEFAULT_OPTIMIZERS:
        assert name in message


def test_missing_package_is_reported_not_crashed() -> None:
    register_optimizer(
        OptimizerEntry("phantom", (("no_such_package_xyz", "Phantom"),), "test entry")
    )
    try:
        assert "phantom" in known_optimizers()
        assert "phantom" not in available_optimizers()
        with pytest.raises(UnknownOptimizerError, match="not installed"):
            check_optimizer_names(["adam", "phantom"])
        with pytest.raises(UnknownOptimizerError, match="no_such_package_xyz"):
            create_optimizer("phantom", _params())
    finally:
        from adabelief.experiments import registry

        registry._REGISTRY.pop("phantom")


def test_check_optimizer_names_normalises_and_deduplicates() -> None:
    assert check_optimizer_names(["Adam", "adam", " sgd "]) == ["adam", "sgd"]


@pytest.mark.parametrize("name", ["adabound", "yogi", "adabelief_ref"])
def test_optional_optimizers_work_when_installed(name: str) -> None:
    if name not in available_optimizers():
        pytest.skip(f"{name} is not installed")
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = create_optimizer(name, [param], **get_preset("classify/digits-cnn").hparams(name))
    param.sum().backward()
    optimizer.step()
    assert not torch.equal(param.detach(), torch.ones(3))


def test_every_preset_builds_every_default_optimizer() -> None:
    for preset in PRESETS.values():
        for name in DEFAULT_OPTIMIZERS:
            create_optimizer(name, _params(), **preset.hparams(name))


def test_paper_values_in_presets() -> None:
    cifar = get_preset("classify/cifar10")
    assert cifar.settings["epochs"] == 200 and cifar.settings["milestones"] == [150]
    assert cifar.hparams("adabelief")["lr"] == 1e-3 and cifar.hparams("adabelief")["eps"] == 1e-8
    assert cifar.hparams("sgd") == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert cifar.hparams("adamw")["weight_decay"] == 1e-2
    assert get_preset("lm/ptb-1layer").hparams("adabelief")["eps"] == 1e-16
    three = get_preset("lm/ptb-3layer")
    assert three.hparams("adabelief")["lr"] == 1e-2 and three.hparams("adabelief")["eps"] == 1e-12
    assert three.settings["milestones"] == [100, 145] and three.settings["clip"] == 0.25
    dcgan = get_preset("gan/dcgan-digits").hparams("adabelief")
    assert dcgan["lr"] == 2e-4 and dcgan["betas"] == [0.5, 0.999] and dcgan["eps"] == 1e-12


def test_unlisted_optimizers_borrow_values() -> None:
    preset = get_preset("classify/cifar10")
    assert preset.hparams("adabelief_ref") == preset.hparams("adabelief")
    assert preset.hparams("adabelief_int8") == preset.hparams("adabelief")
    borrowed = preset.hparams("something_else")
    assert borrowed == {"lr": 1e-3, "weight_decay": 5e-4}


def test_transformer_preset_is_the_papers_recipe() -> None:
    preset = get_preset("transformer/python-docs-char")
    adabelief = preset.hparams("adabelief")
    assert adabelief["eps"] == 1e-16 and adabelief["lr"] == 1.5e-3
    assert adabelief["rectify"] is True and adabelief["weight_decouple"] is True
    assert adabelief["weight_decay"] == 1e-4
    assert preset.settings["warmup"] > 0
    assert get_preset("transformer/wikitext2").hparams("adamw")["betas"] == [0.9, 0.98]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_state_precision_variants(precision: str) -> None:
    layer = torch.nn.Linear(128, 64)
    opt = create_optimizer(f"adabelief_{precision}", layer.parameters(), lr=1e-3)
    assert isinstance(opt, AdaBelief)
    assert opt.param_groups[0]["state_precision"] == precision


#: The bfloat16-model variants and the (master_weights, state_precision) each names.
BF16_MODEL_VARIANTS = {
    "adabelief_bf16w_fp32master": ("fp32", "fp32"),
    "adabelief_bf16w_round": ("round", "fp32"),
    "adabelief_bf16w_residual_int8": ("residual", "int8"),
    "adabelief_bf16w_residual_int4": ("residual", "int4"),
}


@pytest.mark.parametrize(("name", "modes"), BF16_MODEL_VARIANTS.items())
def test_bfloat16_model_variants_train_a_bfloat16_model(name: str, modes: tuple[str, str]) -> None:
    assert get_entry(name).model_dtype == torch.bfloat16
    torch.manual_seed(0)
    model = model_for_optimizer(torch.nn.Linear(64, 80), name)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opt = create_optimizer(name, model.parameters(), lr=1e-3)
    assert isinstance(opt, AdaBelief)
    group = opt.param_groups[0]
    assert (group["master_weights"], group["state_precision"]) == modes
    before = model.weight.detach().clone()
    output = model(torch.randn(4, 64))  # float32 in, float32 out
    assert output.dtype == torch.float32
    output.square().mean().backward()
    opt.step()
    assert model.weight.dtype == torch.bfloat16 and not torch.equal(model.weight, before)


def test_model_for_optimizer_leaves_float32_optimizers_alone() -> None:
    model = torch.nn.Linear(3, 2)
    assert model_for_optimizer(model, "adabelief_int8") is model
    assert model.weight.dtype == torch.float32
    assert not model._forward_pre_hooks and not model._forward_hooks


class _Recurrent(torch.nn.Module):
    """Token ids and a nested float state in, logits and the new state out (as the LSTM)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.cell = torch.nn.Linear(8, 4)
        self.seen: list[torch.dtype] = []

    def forward(
        self, ids: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        self.seen += [ids.dtype, state[0][0].dtype]
        hidden = torch.tanh(self.cell(torch.cat([self.embed(ids), state[0][0]], -1)))
        return hidden, [(hidden, state[0][1])]


def test_the_cast_model_takes_and_returns_float32_through_nested_values() -> None:
    model = model_for_optimizer(_Recurrent(), "adabelief_bf16w_residual_int8")
    state = [(torch.zeros(2, 4), torch.ones(2, 4))]
    for _ in range(2):  # the returned state goes back in
        logits, state = model(torch.tensor([1, 3]), state)
        assert logits.dtype == torch.float32
        assert [t.dtype for t in state[0]] == [torch.float32, torch.float32]
    assert model.seen == [torch.int64, torch.bfloat16] * 2
