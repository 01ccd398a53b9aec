"""PPOConfig: every knob of a PPO run, as a TrainingArguments dataclass (YAML file and CLI flags both work)."""

from __future__ import annotations

import dataclasses
import warnings
import math
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from vlm_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, CRITIC_FREE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS, SCALE_REWARDS
from vlm_rl.algorithms.losses import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, PolicyObjective
from vlm_rl.models.critic import CRITICS
from vlm_rl.data.options import DataOptions
from vlm_rl.errors import ConfigError
from vlm_rl.quiet import on_a_terminal
from vlm_rl.training.inherited_fields import REFUSED, refusal


@dataclass
class PPOConfig(DataOptions, TrainingArguments):
    """PPO for vision-language models, in the style of TRL's configs.

    Batch arithmetic (per process, as in TRL's PPO):
        local_batch_size = per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches
    prompts are rolled out per iteration on each process; each PPO epoch splits them into
    `num_mini_batches` optimiser steps of `gradient_accumulation_steps` micro-batches each. An
    iteration is `num_ppo_epochs x num_mini_batches` optimiser steps whatever the micro-batch split,
    and a mini-batch's gradient does not depend on that split or on the number of processes.

    The data options (`column_map`, `skip_bad_rows`, `max_bad_row_fraction`) are `vlm_rl.data.options.DataOptions`'s.
    Of the inherited TrainingArguments fields, those PPO's own loop does not use are refused when set
    (`refused_fields`, vlm_rl/training/inherited_fields.py), never silently ignored.
    """

    refused_fields: ClassVar[dict[str, str]] = REFUSED

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
        metadata={"help": "Samples (prompt x generation) to roll out in total; default num_train_epochs x dataset size x "
                  "num_generations (or max_steps iterations, when given)."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of responses without eos (recommended with learned rewards); in "
                  "multi-turn rollouts, of the truncated trajectories."},
    )
    tools: str | None = field(
        default=None,
        metadata={"help": "Multi-turn rollouts with tools the model calls in <tool_call> blocks: 'zoom' (built in: a "
                  "quarter of the image at full resolution) or 'module:function,module:function' (each function's "
                  "name, docstring and type hints are its schema; it returns text, images or both)."},
    )
    environment: str | None = field(
        default=None,
        metadata={"help": "Multi-turn rollouts with an environment class 'module:Class': reset(sample), step(text) -> "
                  "Step(observation, reward, done) (vlm_rl/rollout/environment.py)."},
    )
    max_turns: int = field(default=4, metadata={"help": "Model turns per multi-turn trajectory (tools or environment)."})
    max_total_tokens: int = field(
        default=512,
        metadata={"help": "Tokens of a multi-turn trajectory after its prompt (model turns and observations, image "
                  "tokens included); a trajectory that reaches it ends, marked truncated."},
    )
    max_unscored_fraction: float = field(
        default=0.5,
        metadata={"help": "Stop with an error when a reward cannot score (returns None for) more than this fraction of a batch."},
    )

    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimiser steps per PPO epoch."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip: 1 - cliprange below (and above unless epsilon_high is set); TRL's epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    target_kl: float | None = field(
        default=None,
        metadata={"help": "Early stop: once a mini-batch's approximate KL to the rollout policy (policy/approxkl_avg, measured "
                  "in its forwards, over all ranks) exceeds 1.5 x target_kl, its step is the iteration's last (TRL's "
                  "early_stopping, Stable-Baselines3's target_kl). None: every step runs."},
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "KL penalty weight, per token: in the reward, or in the loss with kl_in_loss (TRL's beta). "
                  "0: no reference model is loaded or run."},
    )
    kl_estimator: str | None = field(
        default=None,
        metadata={"help": "k1, k2 or k3; default k1 in the reward (the only unbiased gradient of KL as a reward), k3 in the loss (TRL's)."},
    )
    kl_in_loss: bool = field(
        default=False,
        metadata={"help": "Put kl_coef x KL in the loss per token, as GRPO and TRL do (default: a per-token reward)."},
    )
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={"help": "kl_in_loss: multiply the KL by the importance ratio (TRL's default; DeepSeek-V3.2's unbiased reverse-KL gradient)."},
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
    scale_rewards: str = field(
        default="group",
        metadata={"help": "grpo: divide the centred score by the std of its group (group, or true), of the whole batch "
                  "(batch) or not at all (none, or false: Dr. GRPO). TRL's values."},
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

    # The GRPO family's loss and sampling (TRL GRPOConfig's names and meanings; README: the GRPO family)
    loss_type: str = field(
        default="dapo",
        metadata={"help": "How per-token losses add up: grpo (mean over sequences of their token means), bnpo (token mean "
                  "of each micro-batch), dr_grpo (token sum / max_new_tokens per sequence), dapo (token mean over the "
                  "whole mini-batch on all ranks), cispo (clipped, detached importance weights; as dapo)."},
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip 1 + epsilon_high (clip-higher, DAPO: 0.28); default cliprange. cispo: the largest "
                  "importance weight (ScaleRL: 5.0)."},
    )
    delta: float | None = field(
        default=None, metadata={"help": "Two-sided clipping: the ratio is also capped at delta (> 1 + epsilon_high; INTELLECT-2)."}
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "token, or sequence (GSPO: one ratio per sequence, the geometric mean of its token ratios)."},
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight: minus entropy_coef x the mean token entropy."})
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={"help": "Train only on the tokens whose entropy is in this top fraction of each micro-batch's (all ranks'); 0.2 in 'Beyond the 80/20 Rule'."},
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Responses without an eos (cut at max_new_tokens) take no part in the loss (DAPO's overlong filtering)."}
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "grpo/rloo: drop groups whose scores are all equal and sample further prompts until the batch "
                  "is full or max_sampling_rounds is reached (DAPO)."},
    )
    max_sampling_rounds: int = field(
        default=10, metadata={"help": "dynamic_sampling: rollouts per iteration at most (verl's max_num_gen_batches)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward spec (TRL's); the same as writing SPEC:WEIGHT."}
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

    max_steps: int = field(
        default=-1, metadata={"help": "PPO iterations in all, when > 0 (overrides num_train_epochs; not with total_episodes)."}
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
    disable_tqdm: bool | None = field(
        default=None,
        metadata={"help": "No progress bars, transformers' included; one plain line per logged iteration. Default: "
                  "bars only when stdout and stderr are both terminals (none in a log file or a pipe)."},
    )
    log_level_replica: str = field(
        default="error", metadata={"help": "transformers' log level on the processes other than the main one (error: a warning shows once)."}
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            message = refusal(f.name, getattr(self, f.name), default)
            if message:
                raise ConfigError(message)
        if self.max_steps > 0 and self.total_episodes is not None:
            raise ConfigError(
                f"max_steps={self.max_steps} and total_episodes={self.total_episodes} both set the run's length: give one "
                "(max_steps counts PPO iterations, total_episodes samples)"
            )
        if self.disable_tqdm is None:
            self.disable_tqdm = not on_a_terminal()
        self.kl_estimator = self.kl_estimator or ("k3" if self.kl_in_loss else "k1")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.kl_estimator != "k1" and self.kl_coef > 0 and not self.kl_in_loss:
            warnings.warn(
                f"kl_estimator={self.kl_estimator!r} in the per-token reward: only k1 gives an unbiased gradient of "
                "KL(policy || reference) when the penalty is a reward (k3 is unbiased as a value, not as a reward)",
                stacklevel=2,
            )
        if self.kl_estimator == "k1" and self.kl_coef > 0 and self.kl_in_loss and not self.use_bias_correction_kl:
            warnings.warn(
                "kl_estimator='k1' in the loss without use_bias_correction_kl: its gradient, the score function, is 0 in "
                "expectation (use k3, TRL's, or keep use_bias_correction_kl true)",
                stacklevel=2,
            )
        at_least_one = (
            "per_device_train_batch_size", "gradient_accumulation_steps", "num_ppo_epochs", "num_mini_batches",
            "max_new_tokens", "local_rollout_forward_batch_size", "max_prompt_length", "max_skipped_steps", "eval_num_samples",
            "max_turns", "max_total_tokens",
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
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"target_kl must be > 0 (or unset: no early stop), got {self.target_kl}")
        self.check_data_options()
        for name in ("gamma", "lam", "max_unscored_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.check_estimator()
        self.check_loss()
        if self.eval_steps is not None and (self.eval_steps < 1 or self.eval_steps != int(self.eval_steps)):
            raise ConfigError(f"eval_steps counts PPO iterations: a whole number >= 1, got {self.eval_steps}")
        if self.multi_turn:  # an unknown tool or an environment that cannot load stops the run before any model loads
            from vlm_rl.rollout.environment import environment_factory

            environment_factory(self.tools, self.environment)
        if self.bf16_weights and not self.bf16:
            raise ConfigError("bf16_weights needs --bf16 (it keeps the trained weights in the bf16 compute dtype)")
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        self.fold_reward_weights()
        super().__post_init__()

    @property
    def multi_turn(self) -> bool:
        """Whether rollouts take turns with tools or an environment."""
        return bool(self.tools or self.environment)

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
        # TRL's values, and its bools (from YAML, or as words on the command line): true is "group", false "none"
        as_word = str(self.scale_rewards).lower()
        if as_word in ("true", "false"):
            self.scale_rewards = "group" if as_word == "true" else "none"
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or true/false), got {self.scale_rewards!r}")
        if self.scale_rewards != "group" and estimator != "grpo":
            raise ConfigError(f"scale_rewards is for advantage_estimator=grpo, not {estimator} (leave it group)")
        if self.dynamic_sampling and estimator not in GROUP_ESTIMATORS:
            raise ConfigError(
                f"dynamic_sampling drops groups whose scores are all equal: it needs a group estimator ({', '.join(GROUP_ESTIMATORS)}), "
                f"not advantage_estimator={estimator}"
            )
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")

    def check_loss(self) -> None:
        """The policy loss's fields (TRL GRPOConfig's), against each other."""
        trl_only = ("sapo", "luspo", "vespo")
        if self.loss_type not in LOSS_TYPES:
            also = f" (TRL's {self.loss_type} is not implemented here)" if self.loss_type in trl_only else ""
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}{also}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(
                f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, got {self.importance_sampling_level!r}"
            )
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ConfigError("loss_type cispo caps the importance weight at epsilon_high: set it (ScaleRL uses 5.0)")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ConfigError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        if self.delta is not None:
            if self.loss_type == "cispo":
                raise ConfigError("delta caps the ratio of the clipped losses; loss_type cispo has none (unset delta)")
            if self.delta <= 1:
                raise ConfigError(f"delta caps the importance ratio from above: it must be > 1 (TRL recommends > 1 + epsilon_high), got {self.delta}")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if self.kl_coef == 0 and self.ref_model_name_or_path is not None:
            raise ConfigError("ref_model_name_or_path loads the reference model, which kl_coef 0 does not use: unset one of them")

    def fold_reward_weights(self) -> None:
        """`reward_weights` (TRL's) folded into the reward specs as SPEC:WEIGHT, then cleared."""
        if self.reward_weights is None:
            return
        from reward_models.registry import split_weight

        if len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} weights for {len(self.reward)} reward specs: give one per reward")
        weighted = [spec for spec in self.reward if split_weight(spec)[0] != spec]
        if weighted:
            raise ConfigError(f"reward {weighted[0]!r} carries a weight already: give weights either as SPEC:WEIGHT or in reward_weights")
        self.reward = [f"{spec}:{weight}" for spec, weight in zip(self.reward, self.reward_weights)]
        self.reward_weights = None

    @property
    def uses_reference(self) -> bool:
        """Whether the run has a KL term, hence loads and runs a reference model (TRL: beta != 0)."""
        return self.kl_coef != 0

    @property
    def policy_objective(self) -> PolicyObjective:
        """The policy loss this config asks for (the KL in it only with kl_in_loss)."""
        return PolicyObjective(
            loss_type=self.loss_type,
            epsilon_low=self.cliprange,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            importance_sampling_level=self.importance_sampling_level,
            kl_coef=self.kl_coef if self.kl_in_loss else 0.0,
            kl_estimator=self.kl_estimator,
            use_bias_correction_kl=self.use_bias_correction_kl,
            entropy_coef=self.entropy_coef,
            max_completion_length=self.max_new_tokens,
        )

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
    if config.max_steps > 0:  # PPO iterations, as the Trainer's global_step counts them
        return BatchPlan(global_batch_size, prompts_per_batch, batches_per_epoch, config.max_steps)
    total_episodes = config.total_episodes or int(config.num_train_epochs * num_prompts * config.num_generations)
    if total_episodes < global_batch_size:
        raise ConfigError(f"total_episodes={total_episodes} is less than one batch of {global_batch_size} {batch}")
    return BatchPlan(global_batch_size, prompts_per_batch, batches_per_epoch, math.ceil(total_episodes / global_batch_size))
