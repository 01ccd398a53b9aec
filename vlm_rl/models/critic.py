"""The value function V(query, response[:t]) PPO's GAE needs, in one of three forms (`critic: shared|separate|lora`):

  shared    a value head on the policy's own last hidden states (one backbone, the cheapest; TRL's first PPO);
  separate  its own VLM backbone (vision tower + language model) and value head, started from
            `value_model_name_or_path` (a reward model written by `vlm-rl train-reward`, as InstructGPT and
            LLaVA-RLHF start theirs, an SFT model, or a critic a run saved) or else from the policy's start;
            it sees the image, and trains with its own learning rate (`critic_learning_rate`);
  lora      a second LoRA adapter ("critic") on the LoRA policy's frozen base, plus a value head: the critic costs
            adapter memory only, and its forward runs the base with the critic adapter instead of the policy's.

A `Critic` lives inside `PolicyAndValue`, so accelerate prepares (and DDP/DeepSpeed synchronise) it with the policy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vlm_rl.errors import UserError
from vlm_rl.rollout.logprobs import padded_responses, response_hidden_states, response_logprobs
from vlm_rl.rollout.batch import Rollout
from vlm_rl.models.value_head import VALUE_HEAD_FILE, ValueHead, hidden_size_of, load_value_head, save_value_head

CRITICS = ("shared", "separate", "lora")
CRITIC_ADAPTER = "critic"  # the lora critic's adapter name on the policy
CRITIC_DIR = "critic"  # checkpoint-N/critic/: the separate critic's backbone, or the lora critic's adapter; + its head


class Critic(nn.Module):
    """A value head on hidden states from the policy (`shared`), from `backbone` (`separate`) or from the policy
    run with the critic adapter (`lora`)."""

    def __init__(self, head: ValueHead, backbone: nn.Module | None = None, adapter: str | None = None):
        super().__init__()
        if backbone is not None and adapter is not None:
            raise ValueError("a critic has its own backbone or an adapter on the policy, not both")
        self.head = head
        self.backbone = backbone
        self.adapter = adapter

    @property
    def mode(self) -> str:
        return "separate" if self.backbone is not None else "lora" if self.adapter else "shared"

    def forward(self, policy: nn.Module, rollout: Rollout, policy_hidden: torch.Tensor, where: str) -> torch.Tensor:
        """Values `(B, T_r)` of the response tokens (0 where the response mask is False); `policy_hidden`: the
        policy's hidden states for the same rollout `(B, T_r, H)`, which the shared critic reads."""
        if self.backbone is not None:
            hidden = response_hidden_states(self.backbone, rollout, f"{where} (separate critic)")
        elif self.adapter:
            with active_adapter(policy, self.adapter):
                hidden = response_hidden_states(policy, rollout, f"{where} (lora critic)")
        else:
            hidden = policy_hidden
        return self.head(hidden).masked_fill(~rollout.response_mask, 0.0)  # (B, T_r)

    def owns(self, name: str) -> bool:
        """Whether the parameter `name` of the policy (as `policy.named_parameters()` names it) is the critic's:
        only the lora critic's adapter weights live inside the policy."""
        return bool(self.adapter) and f".{self.adapter}." in name and ".lora_" in name


class PolicyAndValue(nn.Module):
    """The policy and its critic in one module, so that accelerate/DDP/DeepSpeed wrap (and synchronise) them together.

    `critic` is None for the critic-free advantage estimators: the values are then zeros."""

    def __init__(self, policy: nn.Module, critic: Critic | None):
        super().__init__()
        self.policy = policy
        self.critic = critic

    @property
    def value_head(self) -> ValueHead | None:
        return None if self.critic is None else self.critic.head

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes that FSDP shards as units of their own (accelerate's transformer wrap policy reads this
        attribute of the model it prepares): the policy's, and a separate critic's."""
        models = [self.policy] + ([self.critic.backbone] if self.critic is not None and self.critic.backbone is not None else [])
        return sorted({name for m in models for name in (getattr(m, "_no_split_modules", None) or [])})

    def forward(self, rollout: Rollout, temperature: float, where: str = "policy forward") -> tuple[torch.Tensor, ...]:
        """-> logprobs, entropy, values: each `(B, T_r)`, 0 where the response mask is False. The forwards run over
        the rollout's columns that are not padding in every row (`Rollout.trimmed`)."""
        width = rollout.response_mask.shape[1]
        rollout = rollout.trimmed()
        hidden = response_hidden_states(self.policy, rollout, where)  # (B, T_r', H)
        logprobs, entropy = response_logprobs(self.policy, rollout, temperature, hidden=hidden)
        values = torch.zeros_like(logprobs) if self.critic is None else self.critic(self.policy, rollout, hidden, where)
        return tuple(padded_responses(x, width) for x in (logprobs, entropy, values))

    def critic_parameter_names(self) -> set[str]:
        """Names (as `named_parameters()` gives them) of the parameters the critic owns: its head, its backbone
        (separate) or its adapter on the policy (lora)."""
        if self.critic is None:
            return set()
        names = {f"critic.{n}" for n, _ in self.critic.named_parameters()}
        return names | {f"policy.{n}" for n, _ in self.policy.named_parameters() if self.critic.owns(n)}

    # What TRL's unwrap_model_for_generation and transformers' Trainer ask of a model, answered by the policy.
    @property
    def is_gradient_checkpointing(self) -> bool:
        policy = self.policy
        return bool(getattr(policy, "is_activation_checkpointing", getattr(policy, "is_gradient_checkpointing", False)))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.policy.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.activation_checkpointing_disable()


def critic_for(config, critic: Critic | None, policy: nn.Module) -> Critic | None:
    """The run's critic: `critic` as given (checked against `config.critic`), a fresh shared value head when the
    estimator needs one and none was given, None for the critic-free estimators (`config`: a PPOConfig)."""
    if not config.uses_critic:
        if critic is not None:
            raise ValueError(f"advantage_estimator={config.advantage_estimator} has no value model: pass no critic")
        return None
    if critic is None:
        if config.critic != "shared":
            raise ValueError(f"critic={config.critic}: build it with vlm_rl.models.critic.load_critic and pass it")
        critic = Critic(ValueHead(hidden_size_of(policy)))
    if critic.mode != config.critic:
        raise ValueError(f"the critic passed is {critic.mode}, the config says critic={config.critic}")
    return critic


@contextmanager
def keeping_requires_grad(model: nn.Module) -> Iterator[None]:
    """Every parameter's `requires_grad` as it is now, restored when the block ends and whenever the yielded
    `restore()` is called. peft's `set_adapter`, and `disable_adapter()` on exit, freeze the adapters that are not
    active; with a lora critic both adapters train."""
    trainable = {p: p.requires_grad for p in model.parameters()}

    def restore() -> None:
        for p, flag in trainable.items():
            p.requires_grad_(flag)

    try:
        yield restore
    finally:
        restore()


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """`model` (a peft model) with adapter `name` active for the duration, every `requires_grad` kept."""
    previous = model.active_adapter
    with keeping_requires_grad(model) as restore:
        model.set_adapter(name)
        restore()
        try:
            yield
        finally:
            model.set_adapter(previous)


# ---- building -------------------------------------------------------------------------------------


def is_backbone_only(path: str | os.PathLike) -> bool:
    """A directory holding a VLM backbone without its LM head (a reward model's or a saved critic's)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return bool(architectures) and not any(a.endswith("ForConditionalGeneration") for a in architectures)


def starting_head(path: str | os.PathLike, hidden_size: int) -> ValueHead:
    """The value head a critic starts from: `value_head.safetensors` of `path`, else a reward model's head (the
    InstructGPT initialisation: V starts as the reward model's score of the text so far), else a fresh one (V = 0)."""
    from reward_models.vlm_reward import REWARD_HEAD_FILE

    path = Path(path)
    if (path / VALUE_HEAD_FILE).exists():
        return load_value_head(path, hidden_size)
    head = ValueHead(hidden_size)
    if (path / REWARD_HEAD_FILE).exists():
        state = load_file(str(path / REWARD_HEAD_FILE))
        if state["weight"].shape != head.summary.weight.shape:
            raise UserError(f"{path / REWARD_HEAD_FILE}: a head for hidden size {state['weight'].shape[1]}, the critic has {hidden_size}")
        head.summary.load_state_dict({k: v.float() for k, v in state.items()})
    return head


def load_separate_critic(path: str, dtype: torch.dtype, freeze_vision_tower: bool = True) -> Critic:
    """A separate critic from `path`: a full VLM, a peft adapter (merged into its base), or a backbone-only
    directory (a reward model, a saved critic); its head from `starting_head`."""
    from transformers import AutoModel

    from vlm_rl.models.families import family_of
    from vlm_rl.models.loading import load_base_model, require_model
    from vlm_rl.models.sharding import load_unsharded

    path = require_model(path)
    if is_backbone_only(path):
        family_of(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
        backbone = load_unsharded(AutoModel, path, dtype)
    else:
        full = load_base_model(path, dtype)
        backbone = full.model  # vision tower + language model; the LM head is dropped
        del full
    if freeze_vision_tower:
        for module in family_of(backbone).vision_encoder(backbone):  # the tower (and a separate projector)
            module.requires_grad_(False)
    return Critic(starting_head(path, hidden_size_of(backbone)), backbone=backbone)


def add_lora_critic(policy: nn.Module, config, path: str | None = None) -> Critic:
    """A lora critic on the LoRA `policy`: a new adapter with the policy's LoRA settings (or the adapter and head
    saved in `path` by an earlier run), and a value head."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        raise UserError(
            "critic: lora puts the critic's adapter on the LoRA policy's base: set use_peft: true (or start from a "
            "LoRA adapter directory), or choose critic: shared or separate"
        )
    if path is not None:
        if not (Path(path) / "adapter_config.json").exists():
            raise UserError(f"value_model_name_or_path {path}: no adapter_config.json; with critic: lora it must be a critic directory a lora-critic run saved (output_dir/{CRITIC_DIR})")
        policy.load_adapter(path, adapter_name=CRITIC_ADAPTER, is_trainable=True)
    else:
        from vlm_rl.models.families import family_of
        from vlm_rl.models.loading import language_model_lora_config

        lora = language_model_lora_config(
            config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules, family_of(policy), task_type="CAUSAL_LM"
        )
        policy.add_adapter(CRITIC_ADAPTER, lora)
    policy.set_adapter(policy.active_adapter)  # the policy's adapter stays active (add_adapter leaves it so)
    for name, p in policy.named_parameters():
        if f".{CRITIC_ADAPTER}." in name and ".lora_" in name:
            p.requires_grad_(True)
    head = starting_head(path, hidden_size_of(policy)) if path is not None else ValueHead(hidden_size_of(policy))
    return Critic(head, adapter=CRITIC_ADAPTER)


def load_critic(config, policy: nn.Module, start: str) -> Critic | None:
    """The critic `config.critic` asks for (None for the critic-free estimators). `start`: the policy's starting
    checkpoint (resolved), where a shared critic finds a saved value head and a separate one its default start."""
    from vlm_rl.models.loading import is_adapter_dir, torch_dtype_for

    if not config.uses_critic:
        return None
    saved = Path(start) / CRITIC_DIR  # a PPO output or checkpoint that saved a separate or lora critic
    if config.critic == "separate":
        dtype = torch_dtype_for(config.bf16, config.fp16) if config.bf16_weights else torch.float32
        path = config.value_model_name_or_path or (str(saved) if saved.is_dir() else start)
        critic = load_separate_critic(path, dtype, config.freeze_vision_tower)
        if config.activation_checkpointing:  # as for the policy (model_loading)
            kwargs = config.activation_checkpointing_kwargs or {"use_reentrant": False}
            critic.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return critic
    if config.critic == "lora":
        path = config.value_model_name_or_path or (str(saved) if (saved / "adapter_config.json").exists() else None)
        return add_lora_critic(policy, config, path)
    hidden_size = hidden_size_of(policy)
    if config.value_model_name_or_path:  # asked for: it must hold a value head
        return Critic(load_value_head(config.value_model_name_or_path, hidden_size))
    if not is_adapter_dir(start) and (Path(start) / VALUE_HEAD_FILE).exists():  # e.g. a PPO output: its own head
        return Critic(load_value_head(start, hidden_size))
    return Critic(ValueHead(hidden_size))


# ---- checkpoints ---------------------------------------------------------------------------------


def save_critic(critic: Critic, directory: Path, processor, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The critic beside a saved policy: the shared head as `value_head.safetensors` in `directory`; a separate or
    lora critic as `directory/critic/` (backbone or adapter, head, processor), which `value_model_name_or_path`
    accepts. (The lora critic's adapter is written there by the policy's own `save_pretrained`.) `state_dict`: the
    critic's full weights, where its modules hold shards (FSDP2)."""
    from vlm_rl.models.sharding import submodule_state

    head = critic.head
    if state_dict is not None:
        head = ValueHead(head.summary.in_features)
        head.load_state_dict(submodule_state(state_dict, "head."))
    if critic.mode == "shared":
        save_value_head(head, directory)
        return
    target = directory / CRITIC_DIR
    target.mkdir(parents=True, exist_ok=True)
    if critic.backbone is not None:
        backbone_state = None if state_dict is None else submodule_state(state_dict, "backbone.")
        critic.backbone.save_pretrained(target, safe_serialization=True, state_dict=backbone_state)
        processor.save_pretrained(target)
    save_value_head(head, target)


def load_critic_state(critic: Critic, policy: nn.Module, checkpoint: Path) -> None:
    """Restore the critic saved by `save_critic` into `checkpoint` (its weights only; the optimiser is elsewhere)."""
    from vlm_rl.models.sharding import load_unsharded

    source = checkpoint if critic.mode == "shared" else checkpoint / CRITIC_DIR
    critic.head.load_state_dict(load_value_head(source, critic.head.summary.in_features).state_dict())
    if critic.backbone is not None:
        saved = load_unsharded(type(critic.backbone), source, next(critic.backbone.parameters()).dtype)
        critic.backbone.load_state_dict(saved.state_dict())
    elif critic.adapter:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(policy, load_peft_weights(str(source), device="cpu"), adapter_name=critic.adapter)
