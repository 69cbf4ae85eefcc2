"""timm's optimizer factory returns adabelief.AdaBelief under "adabelief.AdaBelief", with timm's
weight-decay groups, on a real (tiny, randomly initialised) timm model."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

import adabelief
from _torchvision_compat import import_torchvision

import_torchvision()
timm = pytest.importorskip(
    "timm", reason="timm is not installed (pip install adabelief[integrations])"
)
pytest.importorskip("timm.optim")

from adabelief.integrations import timm as timm_integration  # noqa: E402


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 0])


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    images, labels = batch()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def test_factory_returns_adabelief_for_the_name_in_any_case():
    for name in ("adabelief.AdaBelief", "ADABELIEF.ADABELIEF", "adabelief.adabelief"):
        optimizer = timm.optim.create_optimizer_v2(tiny_vit(), name, lr=1e-3)
        assert type(optimizer) is adabelief.AdaBelief
    assert timm_integration.NAME.lower() in timm.optim.list_optimizers()


def test_timms_own_adabelief_names_are_left_alone():
    for name, rectify in (("adabelief", False), ("radabelief", True)):
        optimizer = timm.optim.create_optimizer_v2(tiny_vit(), name, lr=1e-3)
        assert type(optimizer) is timm.optim.AdaBelief
        assert optimizer.defaults["rectify"] is rectify


def test_weight_decay_groups_follow_timm():
    model = tiny_vit()
    optimizer = timm.optim.create_optimizer_v2(
        model, "adabelief.AdaBelief", lr=1e-2, weight_decay=0.05
    )
    decay_of = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    no_decay_names = model.no_weight_decay()
    for name, param in model.named_parameters():
        excluded = param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names
        assert decay_of[id(param)] == (0.0 if excluded else 0.05), name
    assert {"pos_embed", "cls_token"} & {n for n, _ in model.named_parameters()} <= no_decay_names

    # With zero gradients the moments stay zero, so a step is the decoupled decay alone:
    # theta *= 1 - lr*wd in the decay group, nothing in the no-decay group.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1.0 - 1e-2 * decay_of[id(param)]
        torch.testing.assert_close(
            param.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name
        )


def test_filter_bias_and_bn_false_keeps_only_the_models_no_weight_decay_names():
    model = tiny_vit()
    optimizer = timm.optim.create_optimizer_v2(
        model, "adabelief.AdaBelief", weight_decay=0.05, filter_bias_and_bn=False
    )
    decay_of = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    for name, param in model.named_parameters():
        assert decay_of[id(param)] == (0.0 if name in model.no_weight_decay() else 0.05), name


def test_keywords_reach_adabelief_and_training_matches_a_direct_construction():
    options = dict(eps=1e-8, betas=(0.8, 0.99), rectify=False, weight_decouple=False, amsgrad=True)
    model = tiny_vit()
    via_timm = timm.optim.create_optimizer_v2(
        model, "adabelief.AdaBelief", lr=3e-3, weight_decay=1e-3, **options
    )
    for group in via_timm.param_groups:
        assert {key: group[key] for key in options} == options
    reference_model = tiny_vit()
    groups = timm.optim.param_groups_weight_decay(
        reference_model, weight_decay=1e-3, no_weight_decay_list=reference_model.no_weight_decay()
    )
    direct = adabelief.AdaBelief(groups, lr=3e-3, **options)
    train_steps(model, via_timm, 3)
    train_steps(reference_model, direct, 3)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert all(int(s["step"]) == 3 for s in via_timm.state.values())


def test_timm_train_script_arguments():
    # timm's train.py: --opt, --opt-eps, --opt-betas, --opt-kwargs go through optimizer_kwargs().
    cfg = Namespace(
        opt="lookahead_adabelief.AdaBelief",
        lr=1e-3,
        weight_decay=0.05,
        momentum=0.9,
        opt_eps=1e-8,
        opt_betas=[0.9, 0.99],
        opt_args={"rectify": False, "state_precision": "bf16"},
    )
    model = tiny_vit()
    optimizer = timm.optim.create_optimizer(cfg, model)
    assert isinstance(optimizer, timm.optim.Lookahead)
    inner = optimizer._base_optimizer  # timm keeps the wrapped optimizer there
    assert type(inner) is adabelief.AdaBelief
    group = inner.param_groups[0]
    assert (group["eps"], tuple(group["betas"]), group["rectify"], group["state_precision"]) == (
        1e-8,
        (0.9, 0.99),
        False,
        "bf16",
    )
    train_steps(model, optimizer, 7)  # Lookahead's slow weights first sync after k=6 steps
    assert all(int(state["step"]) == 7 for state in inner.state.values())


def test_layer_decay_groups_carry_timms_lr_scale():
    model = tiny_vit()
    optimizer = timm.optim.create_optimizer_v2(
        model, "adabelief.AdaBelief", lr=1e-3, weight_decay=0.05, layer_decay=0.75
    )
    assert type(optimizer) is adabelief.AdaBelief
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0
    train_steps(model, optimizer, 1)


def test_register_is_idempotent_and_refuses_to_shadow_silently():
    registry = timm.optim.OptimizerRegistry()
    first = timm_integration.register(registry)
    assert timm_integration.register(registry) is first
    with pytest.raises(ValueError, match="contain no '_'"):
        timm_integration.register(registry, name="ada_belief")
    registry.register(timm.optim.OptimInfo("adabelief", timm.optim.AdaBelief, has_betas=True))
    with pytest.raises(ValueError, match="already registers 'adabelief'"):
        timm_integration.register(registry, name="adabelief")
    timm_integration.register(registry, name="adabelief", replace=True)
    assert type(registry.create_optimizer(tiny_vit(), "adabelief")) is adabelief.AdaBelief
