"""Helpers and the worker process of ``tests/test_distributed.py``.

The module is imported by the test (for the shared model, data and optimizer settings, and for
the single-process references) and run as a script, once per rank, by the test's fixture::

    python tests/_dist_worker.py --rank R --world-size 2 --store FILE --workdir DIR \
        --paths default,single --kinds ddp,zero,fsdp,kernel

One process group (gloo, CPU, a FileStore rendezvous) runs the two-rank scenarios of the given
paths and kinds (DDP, ZeroRedundancyOptimizer, FSDP2 + torch.distributed.checkpoint in each
``state_precision`` and with the master weights of a bfloat16 model, AdaBelief on bare DTensors);
each scenario's outcome, or its traceback, goes to ``DIR/rank{R}.pt`` for the test to check.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import adabelief

#: Optimizer steps of every training scenario; checkpoints are written after RESUME_AT steps.
#: With the default betas the rectified update takes SGD steps up to step 5 and adaptive steps
#: after, so a resume at step 4 crosses the switch.
STEPS = 8
RESUME_AT = 4
GLOBAL_BATCH = 8
#: Seconds a collective may wait before the process group gives up (a hang fails the test).
PG_TIMEOUT_S = 30

#: The kernel each test asks for. "default" leaves the choice to AdaBelief.
PATHS: dict[str, dict[str, Any]] = {
    "default": {},
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
#: Kinds of scenario: DDP, ZeroRedundancyOptimizer, FSDP2 with DCP, bare DTensors.
KINDS = ("ddp", "zero", "fsdp", "kernel")
#: The (paths, kinds) that share one two-rank run: a crash of the fused native kernel (on DTensor,
#: say) must not take the other scenarios down with it.
RUNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unfused": (("default", "single", "foreach"), KINDS),
    "fused": (("fused",), ("ddp", "zero")),
    "fused-dtensor": (("fused",), ("fsdp", "kernel")),
}

#: Two option sets: rectified with decoupled decay (the defaults); and AMSGrad, L2 decay in the
#: gradient, plain bias-corrected update, other betas.
CONFIGS: dict[str, dict[str, Any]] = {
    "rectified": {"lr": 1e-2, "weight_decay": 1e-2},
    "amsgrad-l2": {
        "lr": 1e-2,
        "betas": (0.8, 0.99),
        "amsgrad": True,
        "rectify": False,
        "weight_decouple": False,
        "weight_decay": 1e-2,
    },
}


class FsdpCase(NamedTuple):
    """What an FSDP2 scenario stores: the moments' ``state_precision``, and for a bfloat16 model
    its ``master_weights`` (None: a float32 model)."""

    precision: str
    master_weights: str | None = None
    #: The keys of CONFIGS it runs with (the newer cases with one, to keep the runs short).
    configs: tuple[str, ...] = tuple(CONFIGS)

    @property
    def bfloat16(self) -> bool:
        return self.master_weights is not None


#: The FSDP2 scenarios' state. fp32 trains :func:`make_model`; the others the wider
#: :func:`make_mlp` (in bfloat16 for the master weights), whose hidden weights have compressed
#: moments (not float32: at least MIN_QUANTIZED_NUMEL elements) in blocks that straddle the
#: shards; int4 the same with widths of 68 (its rows come in pairs: see :func:`make_mlp`).
FSDP_CASES: dict[str, FsdpCase] = {
    "fp32": FsdpCase("fp32"),
    "bf16": FsdpCase("bf16"),
    "int8": FsdpCase("int8"),
    "int4": FsdpCase("int4", configs=("amsgrad-l2",)),  # AMSGrad: all three moments in int4
    "bf16-residual": FsdpCase("bf16", "residual", configs=("rectified",)),
    "int8-residual": FsdpCase("int8", "residual", configs=("rectified",)),
    "int8-fp32master": FsdpCase("int8", "fp32", configs=("rectified",)),
}

#: Options of the bare-DTensor kernel checks (on top of the path).
KERNEL_LR = 5e-2  # large enough that one step more or less is far outside bfloat16 rounding
KERNEL_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {"lr": KERNEL_LR},
    "amsgrad-wd-maximize": {
        "lr": KERNEL_LR,
        "amsgrad": True,
        "weight_decay": 0.1,
        "maximize": True,
        "rectify": False,
    },
    "capturable-tensor-lr": {"lr": "tensor", "capturable": True, "weight_decay": 0.1},
    # bfloat16 parameters keep an int8 residual placed as the parameter (element-wise)
    "residual": {"lr": KERNEL_LR, "weight_decay": 0.1, "master_weights": "residual"},
}
KERNEL_PLACEMENTS = ("shard0", "replicate")
KERNEL_STEPS = 7
KERNEL_SHAPE = (5, 3)  # 5 rows: uneven shards over 2 ranks
#: int8 blocks of 256 elements over rows of 129: the shards (19 and 18 rows) split a block.
KERNEL_INT8_SHAPE = (37, 129)
#: int4 blocks of 128 elements over rows of 129, 18 per shard (whole pairs of rows: the shards'
#: codes are whole bytes), so that the shards split a block and pairs of elements cross rows.
KERNEL_INT4_SHAPE = (36, 129)
#: The bare-DTensor cases: parameter dtype, state_precision, shape.
KERNEL_CASES: dict[str, tuple[torch.dtype, str, tuple[int, ...]]] = {
    "float32": (torch.float32, "fp32", KERNEL_SHAPE),
    "bfloat16": (torch.bfloat16, "fp32", KERNEL_SHAPE),
    "complex64": (torch.complex64, "fp32", KERNEL_SHAPE),
    "float32-bf16": (torch.float32, "bf16", KERNEL_SHAPE),
    "float32-int8": (torch.float32, "int8", KERNEL_INT8_SHAPE),
    "bfloat16-int8": (torch.bfloat16, "int8", KERNEL_INT8_SHAPE),
    "float32-int4": (torch.float32, "int4", KERNEL_INT4_SHAPE),
}
#: Shapes and placements of a DTensor on the 2-rank mesh, and the format int4 gives it: int4
#: where each shard holds whole pairs of rows (34 of 68), else its fallback, int8 (33 of 66).
INT4_ON_DTENSOR: dict[str, tuple[tuple[int, int], str, str]] = {
    "68x68-shard0": ((68, 68), "shard0", "int4"),
    "68x68-replicate": ((68, 68), "replicate", "int4"),
    "66x66-shard0": ((66, 66), "shard0", "int8"),
}


def fused_unavailable_reason() -> str | None:
    """None when ``AdaBelief(..., fused=True)`` can be constructed here, else why not."""
    try:
        adabelief.AdaBelief([nn.Parameter(torch.zeros(2))], fused=True)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        return f"fused=True is not available: {type(error).__name__}: {error}"
    return None


def optimizer_kwargs(path: str, config: dict[str, Any], case: str = "fp32") -> dict[str, Any]:
    """The options of a scenario: ``config`` on ``path``, storing the state of FSDP_CASES[case]
    (the bare-DTensor checks name a ``state_precision`` instead, which is also a case)."""
    fsdp_case = FSDP_CASES[case]
    kwargs = {**config, **PATHS[path], "state_precision": fsdp_case.precision}
    if fsdp_case.master_weights is not None:
        kwargs["master_weights"] = fsdp_case.master_weights
    if kwargs.get("lr") == "tensor":
        kwargs["lr"] = torch.tensor(KERNEL_LR)
    return kwargs


def make_model() -> nn.Sequential:
    """The same small MLP, with the same initial weights, in every process; odd widths so that
    FSDP2 shards unevenly."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    torch.random.set_rng_state(generator_state)
    return model


def make_mlp(width: int = 67) -> nn.Sequential:
    """A 5-layer MLP (5 -> 67 -> 67 -> 67 -> 67 -> 3), the same in every process: its three
    67x67 weights (4489 elements) have int8 state, in blocks that cross rows and shards. With
    ``width=68`` the hidden weights have int4 state: 34 rows per shard of 2, an even number, so
    that each shard holds whole bytes of packed codes, and 2312 elements, so that the blocks of
    128 (and 256) cross the shards."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(4321)
    widths = (5, width, width, width, width, 3)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers)
    torch.random.set_rng_state(generator_state)
    return model


def model_for(case: str) -> nn.Sequential:
    """The model of the FSDP2 scenarios of FSDP_CASES[case]."""
    fsdp_case = FSDP_CASES[case]
    if fsdp_case.bfloat16:
        return make_mlp().to(torch.bfloat16)
    if fsdp_case.precision == "int4":
        return make_mlp(width=68)
    return make_model() if fsdp_case.precision == "fp32" else make_mlp()


def batches(steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    """Global batches, the same in every process."""
    generator = torch.Generator().manual_seed(99)
    return [
        (
            torch.randn(GLOBAL_BATCH, 5, generator=generator),
            torch.randn(GLOBAL_BATCH, 3, generator=generator),
        )
        for _ in range(steps)
    ]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[tuple[Tensor, Tensor]],
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """One step per batch; each rank takes its contiguous share of the global batch and the mean
    loss over it, so the gradient averaged over the ranks is the full batch's mean gradient.
    The inputs take the model's dtype, the loss is float32."""
    dtype = next(model.parameters()).dtype
    for x, y in data:
        x_local, y_local = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        loss = nn.functional.mse_loss(model(x_local.to(dtype)).float(), y_local)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference_params(
    path: str, config: str, steps: int = STEPS, case: str = "fp32"
) -> list[Tensor]:
    """Single-process training on the full global batches."""
    model = model_for(case)
    optimizer = adabelief.AdaBelief(
        model.parameters(), **optimizer_kwargs(path, CONFIGS[config], case)
    )
    train(model, optimizer, batches()[:steps])
    return [p.detach().clone() for p in model.parameters()]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Tensor]]:
    """Each parameter's optimizer state as full (unsharded) tensors, in the order of
    ``model.parameters()``."""
    return [
        {
            key: _full(value)
            for key, value in optimizer.state[p].items()
            if isinstance(value, Tensor)
        }
        for p in model.parameters()
    ]


def parameter_formats(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The storage format each parameter's moments got, in the order of ``model.parameters()``."""
    from adabelief import compressed_state

    return [compressed_state.format_of(optimizer.state[p]) for p in model.parameters()]


def kernel_inputs(case: str) -> tuple[Tensor, list[Tensor]]:
    """Initial parameter and per-step gradients of the bare-tensor kernel checks."""
    generator = torch.Generator().manual_seed(7)
    dtype, _, shape = KERNEL_CASES[case]

    def draw() -> Tensor:
        if dtype.is_complex:
            real = torch.randn(*shape, 2, generator=generator)
            return torch.view_as_complex(real).to(dtype)
        return torch.randn(*shape, generator=generator).to(dtype)

    param = draw()
    return param, [draw() for _ in range(KERNEL_STEPS)]


def kernel_run(
    path: str,
    options: str,
    case: str,
    wrap: Callable[[Tensor], Tensor] = lambda t: t,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the optimizer on one parameter with given gradients; ``wrap`` turns a full tensor
    into the tensor the optimizer sees (identity for the reference, a DTensor in the worker).
    Returns the parameter and its state."""
    initial, grads = kernel_inputs(case)
    param = nn.Parameter(wrap(initial.clone()))
    precision = KERNEL_CASES[case][1]
    optimizer = adabelief.AdaBelief(
        [param], **optimizer_kwargs(path, KERNEL_OPTIONS[options], precision)
    )
    for grad in grads:
        param.grad = wrap(grad.clone())
        optimizer.step()
    return param.detach(), dict(optimizer.state[param])


def scenario_names(paths: Iterable[str] = PATHS) -> Iterator[tuple[str, str]]:
    for path in paths:
        for config in CONFIGS:
            yield path, config


def fsdp_cases() -> Iterator[tuple[str, str]]:
    """(config, case) of every FSDP2 scenario of a path."""
    for case, fsdp_case in FSDP_CASES.items():
        for config in fsdp_case.configs:
            yield config, case


def fsdp_scenario_names(paths: Iterable[str] = PATHS) -> Iterator[tuple[str, str, str]]:
    for path in paths:
        for config, case in fsdp_cases():
            yield path, config, case


def checkpoint_dir(workdir: Path, world_size: int, path: str, config: str, case: str) -> Path:
    return workdir / f"ckpt-world{world_size}-{path}-{config}-{case}"


# ---------------------------------------------------------------------------------------------
# The worker: everything below runs in the spawned ranks.


def _full(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def _params(model: nn.Module) -> list[Tensor]:
    return [_full(p) for p in model.parameters()]


def _ddp(rank: int, world_size: int, path: str, config: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    optimizer = adabelief.AdaBelief(model.parameters(), **optimizer_kwargs(path, CONFIGS[config]))
    train(model, optimizer, batches(), rank, world_size)
    return {"params": _params(model.module)}


def _zero(rank: int, world_size: int, path: str, config: str) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(),
        optimizer_class=adabelief.AdaBelief,
        **optimizer_kwargs(path, CONFIGS[config]),
    )
    data = batches()
    train(model, optimizer, data[:RESUME_AT], rank, world_size)
    local_params = sum(p.numel() for group in optimizer.optim.param_groups for p in group["params"])
    optimizer.consolidate_state_dict(to=0)
    result: dict[str, Any] = {
        "params_at_resume": _params(model.module),
        "local_numel": local_params,
    }
    if rank == 0:
        # A copy: the state_dict holds the live state tensors, which the next steps update.
        result["state_dict"] = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, data[RESUME_AT:], rank, world_size)
    result["params"] = _params(model.module)
    return result


def _fsdp_model(case: str, mesh: Any = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = model_for(case)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def _fsdp(
    rank: int, world_size: int, path: str, config: str, case: str, workdir: Path
) -> dict[str, Any]:
    """Uninterrupted FSDP2 training with a DCP checkpoint at RESUME_AT; resumed from that
    checkpoint (2 -> 2) and from the one-process checkpoint the test wrote (1 -> 2), with the
    state each load restored."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    kwargs = optimizer_kwargs(path, CONFIGS[config], case)
    data = batches()
    model = _fsdp_model(case)
    optimizer = adabelief.AdaBelief(model.parameters(), **kwargs)
    train(model, optimizer, data[:RESUME_AT], rank, world_size)
    states = list(optimizer.state.values())
    sharded_state = bool(states) and all(
        isinstance(value, DTensor)
        for s in states
        for key, value in s.items()
        if key != "step" and isinstance(value, Tensor)
    )
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_state, "optim": optim_state},
        checkpoint_id=str(checkpoint_dir(workdir, world_size, path, config, case)),
    )
    result: dict[str, Any] = {
        "sharded_state": sharded_state,
        "formats": parameter_formats(model, optimizer),
        "state_at_resume": full_state(model, optimizer),
    }
    train(model, optimizer, data[RESUME_AT:], rank, world_size)
    result["params"] = _params(model)

    for source_world_size in (world_size, 1):
        source = checkpoint_dir(workdir, source_world_size, path, config, case)
        if source_world_size == 1 and not source.exists():
            continue  # the test wrote none (path unavailable in the test process)
        model = _fsdp_model(case)
        optimizer = adabelief.AdaBelief(model.parameters(), **kwargs)
        load_checkpoint(model, optimizer, source)
        result[f"loaded_from_world{source_world_size}"] = full_state(model, optimizer)
        train(model, optimizer, data[RESUME_AT:], rank, world_size)
        result[f"resumed_from_world{source_world_size}"] = _params(model)
    return result


def _kernel(mesh: Any, path: str, options: str, case: str) -> dict[str, Any]:
    """The optimizer on bare DTensor parameters and gradients, sharded and replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    results = {}
    for placement in KERNEL_PLACEMENTS:
        placements = [Shard(0) if placement == "shard0" else Replicate()]
        try:
            param, state = kernel_run(
                path, options, case, lambda t, p=placements: distribute_tensor(t, mesh, p)
            )
            results[placement] = {
                "param": _full(param),
                "state": {key: _full(value) for key, value in state.items()},
            }
        except Exception:
            results[placement] = {"error": traceback.format_exc()}
    return results


def _int4_on_dtensor(mesh: Any) -> dict[str, Any]:
    """The format ``state_precision="int4"`` gives each DTensor of INT4_ON_DTENSOR, and why
    int4 refused its layout (None where it did not)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from adabelief import compressed_state

    formats = {}
    for name, (shape, placement, _) in INT4_ON_DTENSOR.items():
        placements = [Shard(0) if placement == "shard0" else Replicate()]
        param = distribute_tensor(torch.zeros(shape), mesh, placements)
        formats[name] = (
            compressed_state.storage_format(param, "int4"),
            compressed_state.FORMATS["int4"].layout_refusal(param),
        )
    return formats


#: The line a rank writes to its log before each scenario, so that a rank that dies in native
#: code (no traceback, no result file) can be told apart by the scenario it was in.
SCENARIO_MARK = "[scenario] "


#: ``KEY:ATTEMPT,...``: rank 0 aborts (SIGABRT, as a crash in native code) when it reaches scenario
#: KEY in that attempt of the run; the harness's own tests use it.
ABORT_ENV = "ADABELIEF_TEST_DIST_ABORT"
_attempt = 1


def _abort_here(key: str) -> bool:
    import torch.distributed as dist

    wanted = {tuple(item.rsplit(":", 1)) for item in os.environ.get(ABORT_ENV, "").split(",")}
    return dist.get_rank() == 0 and (key, str(_attempt)) in wanted


def _guard(key: str, function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one scenario: its result, or its traceback as ``{"error": ...}``."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    print(f"{SCENARIO_MARK}{key}", flush=True)
    if _abort_here(key):
        os.abort()
    try:
        return function(*args)
    except (Exception, CheckpointException):
        return {"error": traceback.format_exc()}


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--paths", required=True, help="comma-separated keys of PATHS")
    parser.add_argument("--kinds", required=True, help="comma-separated entries of KINDS")
    parser.add_argument("--attempt", type=int, default=1, help="1, or 2 for the harness's rerun")
    args = parser.parse_args()
    global _attempt
    _attempt = args.attempt
    rank, world_size, workdir = args.rank, args.world_size, args.workdir
    paths, kinds = args.paths.split(","), args.kinds.split(",")

    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    fused_reason = fused_unavailable_reason()
    results: dict[str, Any] = {"fused_unavailable": fused_reason}
    try:
        for path, config in scenario_names(paths):
            if path == "fused" and fused_reason is not None:
                continue
            for kind, function in (("ddp", _ddp), ("zero", _zero)):
                if kind in kinds:
                    key = f"{kind}/{path}/{config}"
                    results[key] = _guard(key, function, rank, world_size, path, config)
                    dist.barrier()
        for path, config, case in fsdp_scenario_names(paths) if "fsdp" in kinds else ():
            if path == "fused" and fused_reason is not None:
                continue
            key = f"fsdp/{path}/{config}/{case}"
            results[key] = _guard(key, _fsdp, rank, world_size, path, config, case, workdir)
            dist.barrier()
        mesh = init_device_mesh("cpu", (world_size,))
        if "kernel" in kinds and "default" in paths:
            key = "kernel/default/int4-on-dtensor"
            results[key] = _guard(key, _int4_on_dtensor, mesh)
        for path in paths:
            if "kernel" not in kinds or (path == "fused" and fused_reason is not None):
                continue
            for options in KERNEL_OPTIONS:
                for case in KERNEL_CASES:
                    key = f"kernel/{path}/{options}/{case}"
                    results[key] = _guard(key, _kernel, mesh, path, options, case)
        dist.barrier()
    finally:
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
