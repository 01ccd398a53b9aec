"""What PPO needs from each engine accelerate can run it under (DDP, DeepSpeed ZeRO-2/3): the engine's batch
geometry, frozen models prepared the way the engine needs, and full weights gathered for saving."""

from __future__ import annotations

from contextlib import contextmanager

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


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


def prepare_frozen(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """A frozen model (the reference) ready for forwards: partitioned like the policy under ZeRO-3 (TRL's
    `prepare_deepspeed`; its `.module` runs the forwards, gathering each layer's shards), else on the device."""
    if zero_stage(accelerator) == 3:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator).module
    return model.to(accelerator.device)


@contextmanager
def gathered_parameters(model: nn.Module, accelerator: Accelerator, modify: bool = False):
    """Under ZeRO-3, the full parameters of `model` on every rank for the duration; with `modify`, what the main
    process writes into them is partitioned back to every rank at the end. Elsewhere, nothing to do."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None):
            yield
    else:
        yield


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
