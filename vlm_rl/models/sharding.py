"""What PPO needs from each engine accelerate can run it under (DDP, DeepSpeed ZeRO-2/3, FSDP2): a check that the
engine asked for is the one running, the engine's batch geometry, frozen models sharded the way the policy is,
whole weights where a call bypasses the sharded forward, and full weights and optimizer state for checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from vlm_rl.errors import ConfigError


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp2(accelerator: Accelerator) -> bool:
    return accelerator.is_fsdp2  # (FSDP running, version 2)


def check_engine(accelerator: Accelerator, fsdp: bool = False, deepspeed: bool = False) -> None:
    """Stop when the launch asked for FSDP or DeepSpeed (an accelerate config, or `fsdp`/`deepspeed` given to the
    trainer) and accelerate set up something else, instead of silently training under it."""
    running = accelerator.distributed_type
    if (fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true") and running != DistributedType.FSDP:
        raise ConfigError(
            f"the launch asks for FSDP but accelerate set up {running.value}: accelerate enables FSDP on GPUs only, with "
            "more than one process. Launch on GPUs, or use configs/accelerate/ddp.yaml (or a ZeRO config) here"
        )
    if (deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true") and running != DistributedType.DEEPSPEED:
        raise ConfigError(f"the launch asks for DeepSpeed but accelerate set up {running.value}: check the accelerate config and that deepspeed is installed")
    if running == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp2.yaml)")


def check_deepspeed_skips_non_finite_steps(accelerator: Accelerator) -> None:
    """Stop unless DeepSpeed's engine skips an optimizer step whose gradient is not finite, as PPO's skipped steps
    promise (the engine steps inside the last backward, before PPO sees the gradient norm). Its ZeRO optimizers
    (stage 1-3) and its fp16/bf16 optimizers check the norm and skip; without ZeRO in fp32 it steps the plain
    optimizer whatever the gradient."""
    if not is_deepspeed(accelerator) or zero_stage(accelerator) >= 1:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("bf16", {}).get("enabled") or config.get("fp16", {}).get("enabled"):
        return
    raise ConfigError(
        "DeepSpeed without ZeRO (zero_stage 0) in fp32 applies every optimizer step, even one whose gradient is not "
        "finite, which PPO must skip: use zero_stage 1-3 (configs/accelerate/zero2.yaml), --mixed_precision bf16, or "
        "DDP (configs/accelerate/ddp.yaml)"
    )


def describe_placement(models: dict[str, nn.Module], accelerator: Accelerator) -> str:
    """One line: the engine, and for each model whether its weights are sharded over the ranks (FSDP2 DTensors,
    ZeRO-3 partitions) or whole on each, read from the parameters themselves."""
    from torch.distributed.tensor import DTensor

    def placement(model: nn.Module) -> str:
        sharded = any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())
        return "sharded" if sharded else "whole on each rank"

    engine = "FSDP2" if is_fsdp2(accelerator) else f"ZeRO-{zero_stage(accelerator)}" if is_deepspeed(accelerator) else accelerator.distributed_type.value
    return f"weights ({engine}, {accelerator.num_processes} process(es)): " + ", ".join(f"{name} {placement(m)}" for name, m in models.items())


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage under DeepSpeed, 0 otherwise."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, accumulation: int, max_grad_norm: float | None) -> None:
    """Give DeepSpeed PPO's geometry before `prepare`: a micro-batch per backward, `accumulation` backwards per
    optimiser step (the engine steps at our boundary), and PPO's gradient clipping (DeepSpeed clips itself)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm or 0.0


def cast_to_engine_dtype(model: nn.Module, accelerator: Accelerator) -> None:
    """Under DeepSpeed's bf16/fp16 mode, which holds every weight in one dtype (the fp32 masters live in the
    optimizer), the parameters still in another (a fresh fp32 value head, a separate critic, peft's fp32 adapters)
    cast to it before `prepare`: ZeRO-3 cannot partition a mix. Weights ZeRO-3 partitioned at load are left."""
    if not is_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float16 if config.get("fp16", {}).get("enabled") else None
    if dtype is None:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)


def prepare_frozen(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """A frozen model (the reference, a learned reward model) ready for forwards, in place: partitioned like the
    policy under ZeRO-3 (TRL's `prepare_deepspeed`; forwards gather each layer's shards) or FSDP2 (accelerate's
    fully_shard preparation: each layer a unit), else on the device."""
    if zero_stage(accelerator) == 3:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator).module
    if is_fsdp2(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, model.to(accelerator.device))
        model.eval()
        return model
    return model.to(accelerator.device)


@contextmanager
def unsharded_roots(models: list[nn.Module], accelerator: Accelerator) -> Iterator[None]:
    """Under FSDP2, the root-level parameters of each model (those in no layer unit: the patch embedding, the
    merger, the value head) whole for the duration, for calls that do not go through the model's own forward:
    `generate`, image encoding, a backbone + LM-head forward. Each layer unit still gathers its own parameters in
    its forward, so every rank must make the same calls. Elsewhere nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    with ExitStack() as stack:
        for model in models:
            if is_fsdp2(accelerator) and isinstance(model, FSDPModule):
                stack.enter_context(_unsharded(model))
        yield


@contextmanager
def _unsharded(model) -> Iterator[None]:
    # FSDP2 takes the first module to run forward as the root: before any layer runs outside the root's
    # forward (a generate first of all), the root is initialised as such.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextmanager
def gathered_parameters(model: nn.Module, accelerator: Accelerator) -> Iterator[dict[str, torch.Tensor] | None]:
    """The full weights of `model` for saving, gathered from every rank (a collective: every rank enters). Under
    FSDP2 it yields the full state dict (on the main process; CPU tensors), which the saver writes instead of the
    module's own (a sharded module's `state_dict()` holds shards); under ZeRO-3 the module's parameters are whole
    for the duration and it yields None; elsewhere nothing to gather."""
    if is_fsdp2(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        yield get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield None
    else:
        yield None


@contextmanager
def writable_parameters(model: nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """`model`'s parameters whole for the duration, with what the main process writes into them kept: under ZeRO-3,
    where transformers partitions a model as it loads, they are gathered and partitioned back at the end.
    Elsewhere (FSDP2 shards only at `prepare`) nothing to do."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            yield
    else:
        yield


def submodule_state(full: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a full state dict under `prefix` ("policy."), named as the submodule names them."""
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator, path: Path) -> None:
    """The optimizer state to `path` (written by the main process). Under FSDP2 it is gathered whole first (every
    rank enters) and keyed by parameter name, so it loads on any number of ranks."""
    if is_fsdp2(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = optimizer.state_dict()
    if accelerator.is_main_process:
        torch.save(state, path)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator, path: Path) -> None:
    """Restore what `save_optimizer` wrote (every rank reads the file; under FSDP2 each keeps its shard)."""
    # On the CPU (a CPU rank's device can be "cpu:N", which torch.load cannot map to); the optimizer moves each
    # state tensor to its parameter's device.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if is_fsdp2(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def load_unsharded(model_class, path, dtype):
    """`model_class.from_pretrained(path)` as a whole model on this rank, even while a ZeRO-3 run is set up
    (transformers would otherwise partition it at load)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        return model_class.from_pretrained(path, dtype=dtype)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = config
