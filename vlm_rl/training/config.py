"""PPOConfig: every knob of a PPO run, as a TrainingArguments dataclass (YAML file and CLI flags both work)."""

from __future__ import annotations

import warnings
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from vlm_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, CRITIC_FREE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS
from vlm_rl.models.critic import CRITICS
from vlm_rl.errors import ConfigError


@dataclass
class PPOConfig(TrainingArguments):
    """PPO for vision-language models, in the style of TRL's configs.

    Batch arithmetic (per process, as in TRL's PPO):
        local_batch_size = per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches
    prompts are rolled out per iteration on each process; each PPO epoch splits them into
    `num_mini_batches` optimiser steps of `gradient_accumulation_steps` micro-batches each. An
    iteration is `num_ppo_epochs x num_mini_batches` optimiser steps whatever the micro-batch split,
    and a mini-batch's gradient does not depend on that split or on the number of processes.
    """

    # Model and data
    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "Policy to start from: a local Qwen2-VL directory, a peft adapter directory, or 'tiny' (the embedded tiny model)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model; default: the policy as it is when PPO starts."}
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Where the critic starts. critic shared: a directory holding value_head.safetensors (default: the "
                  "policy's own head if it has one, else a fresh head). separate: a reward model (vlm-rl train-reward), an "
                  "SFT model or a saved critic (default: the policy's start). lora: a saved lora critic (default: a fresh adapter)."},
    )
    train_data: str = field(
        default="synthetic", metadata={"help": "Prompt dataset (.jsonl/.json/dataset dir), or 'synthetic' (the embedded shapes VQA set)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to read when train_data is a dataset directory."})
    reward: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={"help": "Reward spec(s), each optionally SPEC:WEIGHT (see reward_models.load_reward)."},
    )
    max_prompt_length: int = field(default=1024, metadata={"help": "Longer prompts (image tokens included) are an error, never cut."})
    skip_long_prompts: bool = field(default=False, metadata={"help": "Drop prompts longer than max_prompt_length instead of failing."})
    min_pixels: int | None = field(default=None, metadata={"help": "Override the processor's min_pixels."})
    max_pixels: int | None = field(default=None, metadata={"help": "Override the processor's max_pixels."})

    # Rollout
    max_new_tokens: int = field(default=32, metadata={"help": "Response length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (logprobs use the same)."})
    local_rollout_forward_batch_size: int = field(default=16, metadata={"help": "Micro-batch for the no-grad scoring forwards."})
    max_tokens_per_micro_batch: int | None = field(
        default=None,
        metadata={"help": "Micro-batches of the scoring and training forwards by tokens instead of by samples: samples "
                  "sorted by length fill micro-batches of at most this many tokens (padding included), so padding is "
                  "not computed. Replaces local_rollout_forward_batch_size, and per_device_train_batch_size's split "
                  "of a mini-batch (the mini-batch stays per_device_train_batch_size x gradient_accumulation_steps)."},
    )
    share_prompts: bool = field(
        default=True,
        metadata={"help": "Each distinct prompt of a rollout (a group of num_generations samples) processed, encoded "
                  "(each distinct image once) and prefilled once, its KV cache repeated for its samples, in generate "
                  "and in the scoring and training forwards. false: every sample on its own."},
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Samples (prompt x generation) to roll out in total; default num_train_epochs x dataset size x num_generations."},
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses without eos (recommended with learned rewards)."}
    )
    max_unscored_fraction: float = field(
        default=0.5,
        metadata={"help": "Stop with an error when a reward cannot score (returns None for) more than this fraction of a batch."},
    )

    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimiser steps per PPO epoch."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty weight in the per-token reward."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "k1 (the only unbiased gradient of KL as a per-token reward), k2 or k3."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the shaped per-token rewards before GAE."})

    # Advantage estimator and critic
    advantage_estimator: str = field(
        default="gae",
        metadata={"help": "gae (PPO with the value head), or critic-free: grpo, rloo (need num_generations >= 2) or reinforce_pp (README: advantage estimators)."},
    )
    num_generations: int = field(
        default=1,
        metadata={"help": "Samples per prompt, rolled out together on one process; the local batch holds local_batch_size / num_generations prompts."},
    )
    scale_rewards: bool = field(
        default=True, metadata={"help": "grpo: divide by the group's reward std (false: only centre, as Dr. GRPO)."}
    )
    critic: str = field(
        default="shared",
        metadata={"help": "gae's value model: shared (a value head on the policy's backbone), separate (its own VLM "
                  "backbone that sees the image, from value_model_name_or_path) or lora (a second adapter on the LoRA "
                  "policy's base). README: critics."},
    )
    critic_learning_rate: float | None = field(
        default=None, metadata={"help": "The critic's learning rate (its own optimiser parameter group); default: learning_rate."}
    )
    critic_warmup_steps: int = field(
        default=0, metadata={"help": "gae: the first N iterations train only the value head, the policy frozen (OpenRLHF's freezing_actor_steps)."}
    )

    # LoRA
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter; the reference is the base with adapters disabled."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Language-model modules to adapt (default: the model family's, vlm_rl.models.families; the vision tower stays frozen)."},
    )
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision encoder frozen in full fine-tuning."})
    reuse_vision_features: bool = field(
        default=True,
        metadata={"help": "Encode each rollout image once and reuse the features in every later forward where that is "
                  "exact (the vision tower frozen; the reference's or reward model's tower of equal weights). Off "
                  "automatically where it is not; false: every forward encodes its own images."},
    )

    # Precision and robustness
    bf16_weights: bool = field(
        default=False,
        metadata={"help": "With --bf16, keep the trained weights in bf16 too (saves memory; small updates are lost to rounding). Default: fp32 master weights, bf16 compute."},
    )
    max_skipped_steps: int = field(
        default=3, metadata={"help": "Stop after this many optimiser steps in a row skipped for a non-finite loss or gradient norm."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir that already holds a run (it is set aside, deleted when this one ends).",
                  "aliases": ["--overwrite"]},
    )

    # Runtime
    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU intra-op threads. 1 is fastest for tiny models: on small VMs thread wake-ups cost more than the matmuls (benchmarks/cpu_threads.py)."},
    )

    # Sharded engines
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Under ZeRO-3, gather the policy's full weights for generation (fast); false: generate "
                  "with sharded weights, all ranks in lockstep (for models too large to gather)."},
    )

    # Logging and evaluation
    num_sample_generations: int = field(
        default=0,
        metadata={"help": "Show this many sample generations per logging step: a table on the console and, with their "
                  "images, in wandb/trackio (report_to)."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out prompts the policy answers every eval_steps iterations (any supported format)."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split to read when eval_data is a dataset directory."})
    eval_num_samples: int = field(default=64, metadata={"help": "Held-out prompts per evaluation (the first ones of eval_data)."})

    # TrainingArguments defaults that differ for PPO
    learning_rate: float = field(default=3e-6)
    report_to: None | str | list[str] = field(default="tensorboard")
    save_steps: float = field(default=0, metadata={"help": "Checkpoint every N PPO iterations (0: only at the end)."})
    logging_steps: float = field(default=1)
    eval_steps: float | None = field(
        default=None, metadata={"help": "Evaluate on eval_data every N PPO iterations (default: 10 times per run, and at the end)."}
    )
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.kl_estimator != "k1" and self.kl_coef > 0:
            warnings.warn(
                f"kl_estimator={self.kl_estimator!r} in the per-token reward: only k1 gives an unbiased gradient of "
                "KL(policy || reference) when the penalty is a reward (k3 is unbiased as a value, not as a reward)",
                stacklevel=2,
            )
        at_least_one = (
            "per_device_train_batch_size", "gradient_accumulation_steps", "num_ppo_epochs", "num_mini_batches",
            "max_new_tokens", "local_rollout_forward_batch_size", "max_prompt_length", "max_skipped_steps", "eval_num_samples",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ConfigError(f"max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ConfigError(f"total_episodes must be >= 1, got {self.total_episodes}")
        for name in ("kl_coef", "vf_coef", "learning_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam", "max_unscored_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.check_estimator()
        if self.eval_steps is not None and (self.eval_steps < 1 or self.eval_steps != int(self.eval_steps)):
            raise ConfigError(f"eval_steps counts PPO iterations: a whole number >= 1, got {self.eval_steps}")
        if self.bf16_weights and not self.bf16:
            raise ConfigError("bf16_weights needs --bf16 (it keeps the trained weights in the bf16 compute dtype)")
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        super().__post_init__()

    def check_estimator(self) -> None:
        """The advantage estimator's fields, against each other and the batch geometry."""
        estimator = self.advantage_estimator
        if estimator not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {estimator!r}")
        if self.num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {self.num_generations}")
        if estimator in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be >= 2 with advantage_estimator={estimator} (its baseline is the other samples of "
                f"the same prompt), got {self.num_generations}"
            )
        if self.local_batch_size % self.num_generations:
            raise ConfigError(
                f"num_generations={self.num_generations} must divide the local batch (per_device_train_batch_size x "
                f"gradient_accumulation_steps x num_mini_batches = {self.local_batch_size}): each prompt's samples are "
                "rolled out together on one process"
            )
        if self.critic_warmup_steps < 0:
            raise ConfigError(f"critic_warmup_steps must be >= 0, got {self.critic_warmup_steps}")
        if self.critic not in CRITICS:
            raise ConfigError(f"critic must be one of {', '.join(CRITICS)}, got {self.critic!r}")
        if self.critic_learning_rate is not None and self.critic_learning_rate <= 0:
            raise ConfigError(f"critic_learning_rate must be > 0, got {self.critic_learning_rate}")
        if estimator in CRITIC_FREE_ESTIMATORS:
            for name, unused, why in (
                ("critic", self.critic != "shared", "chooses the value model"),
                ("critic_learning_rate", self.critic_learning_rate is not None, "trains the value model"),
                ("critic_warmup_steps", self.critic_warmup_steps > 0, "warms up the value model"),
                ("value_model_name_or_path", self.value_model_name_or_path is not None, "starts the value model"),
                ("whiten_rewards", self.whiten_rewards, "whitens the rewards before GAE"),
            ):
                if unused:
                    raise ConfigError(f"{name} {why}: it is for advantage_estimator=gae, and {estimator} has no value model (unset {name})")
        if not self.scale_rewards and estimator != "grpo":
            raise ConfigError(f"scale_rewards is for advantage_estimator=grpo, not {estimator} (leave it true)")

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs the value head (only gae does)."""
        return self.advantage_estimator not in CRITIC_FREE_ESTIMATORS

    @property
    def local_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def local_mini_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


@dataclass(frozen=True)
class BatchPlan:
    """How a run's samples divide into iterations."""

    global_batch_size: int  # samples (episodes) per iteration, over all processes
    prompts_per_batch: int  # prompts per iteration (each sampled num_generations times)
    batches_per_epoch: int  # iterations per pass over the prompts
    num_total_batches: int  # iterations of the run


def plan_batches(config: PPOConfig, num_prompts: int, num_processes: int) -> BatchPlan:
    """The iterations of a run of `config` over `num_prompts` prompts on `num_processes` processes; a ConfigError when
    the dataset or `total_episodes` is smaller than one batch."""
    global_batch_size = config.local_batch_size * num_processes
    prompts_per_batch = global_batch_size // config.num_generations
    batches_per_epoch = num_prompts // prompts_per_batch
    batch = "(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches x processes)"
    if batches_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {num_prompts} prompts, fewer than one batch of {prompts_per_batch} "
            f"({global_batch_size} samples {batch} / num_generations={config.num_generations})"
        )
    total_episodes = config.total_episodes or int(config.num_train_epochs * num_prompts * config.num_generations)
    if total_episodes < global_batch_size:
        raise ConfigError(f"total_episodes={total_episodes} is less than one batch of {global_batch_size} {batch}")
    return BatchPlan(global_batch_size, prompts_per_batch, batches_per_epoch, math.ceil(total_episodes / global_batch_size))
