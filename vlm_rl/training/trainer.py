"""PPOTrainer: the PPO loop for vision-language models, orchestrated with accelerate.

One iteration is seven steps, each a method of PPOTrainer, in order (the first two from rollout_stage.py): the prompts of the batch (`batch_samples`), the
rollout (`make_rollout`: one batched `generate`), scoring (`score`: old-policy logprobs, reference logprobs, values,
rewards), advantages (`advantages`), optimisation (`optimise`), metrics (`metrics`), then logging and a checkpoint
(`end_iteration`). The math is in vlm_rl/algorithms/, the models in vlm_rl/models/, the rollout's pieces in
vlm_rl/rollout/; the rollout's steps (rollout_stage.py), the optimiser and schedule (optimisers.py), checkpoints
(checkpointing.py), the output directory (output_dir.py) and metrics (metrics.py) have their own modules (at ~620
lines this file is over the project's 450-line mark on purpose: scoring, advantages and the optimisation of one
iteration read top to bottom here). Built on transformers' Trainer for what users expect of a TRL trainer (report_to, callbacks, the
progress bar, TrainerState and trainer_state.json, checkpoint rotation).

What stays right at scale: one optimiser step (and one gradient clip) per mini-batch, whatever its split
into micro-batches; each micro-batch's loss is its share of the whole mini-batch's on all ranks, as its loss type
defines it (so the gradient does not depend on the split or on the number of ranks wherever the definition allows
it: README, the GRPO family); advantages are whitened over the global batch; fp32
master weights under bf16 autocast; samples a reward cannot score take no part in the update; every
collective is issued identically on every rank whatever the data.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerState
from transformers.trainer_callback import ExportableState
from trl.trainer.utils import disable_dropout_in_model

from reward_models.vlm_reward import learned_reward_models
from vlm_rl.algorithms.advantages import GROUP_ESTIMATORS, compute_gae, discounted_returns, grpo_advantages, kl_penalty, rloo_advantages, shape_rewards, whiten
from vlm_rl.algorithms.losses import LossNormaliser, high_entropy_mask, past_target_kl, policy_loss, value_loss
from vlm_rl.algorithms.masking import masked_mean
from vlm_rl.atomic import atomic_file
from vlm_rl.data.formats import PromptDataset
from vlm_rl.data.prompts import drop_long_prompts
from vlm_rl.errors import ConfigError
from vlm_rl.models.critic import Critic, PolicyAndValue, critic_for, keeping_requires_grad
from vlm_rl.models.dummy_image import expect_videos
from vlm_rl.models.families import family_of
from vlm_rl.models.sharding import (
    cast_to_engine_dtype,
    check_deepspeed_skips_non_finite_steps,
    check_engine,
    configure_deepspeed,
    describe_placement,
    is_deepspeed,
    is_fsdp2,
    prepare_frozen,
    unsharded_roots,
    zero_stage,
)
from vlm_rl.models.vision_features import plan_sharing, tower_trains
from vlm_rl.rollout.batch import Rollout
from vlm_rl.rollout.generation import eos_token_ids, make_generation_config, pad_token_id, rng_devices
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.rollout.multi_turn import setup_multi_turn
from vlm_rl.rollout.micro_batches import by_count, by_tokens
from vlm_rl.training import checkpoint as ckpt
from vlm_rl.training import console
from vlm_rl.training.checkpointing import CONFIG_FILE, CheckpointingMixin
from vlm_rl.training.optimisers import OptimisersMixin
from vlm_rl.training.config import PPOConfig, plan_batches
from vlm_rl.training.console import use_metrics_line
from vlm_rl.training.dynamic_sampling import sample_with_signal
from vlm_rl.training.integrations import show_samples
from vlm_rl.training.metrics import iteration_metrics
from vlm_rl.training.output_dir import claim_output_dir
from vlm_rl.training.preemption import Preempted, StopOnSignal, resume_command
from vlm_rl.training.rollout_stage import RolloutMixin
from vlm_rl.training.scoring import RolloutRewards

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """`max_skipped_steps` optimiser steps in a row had a non-finite loss or gradient norm."""


class PPOTrainer(RolloutMixin, OptimisersMixin, CheckpointingMixin, Trainer):
    """PPO for Qwen2-VL-style VLMs with a critic (shared value head, separate value model or LoRA critic; see
    vlm_rl/models/critic.py), or critic-free (GRPO, RLOO, REINFORCE++); `accelerate launch` it like any TRL trainer."""

    def __init__(
        self,
        args: PPOConfig,
        processing_class,
        model: nn.Module,
        ref_model: nn.Module | None,
        reward,
        train_dataset: PromptDataset,
        critic: Critic | None = None,
        callbacks=None,
        eval_dataset: PromptDataset | None = None,
    ):
        if not args.uses_reference and ref_model is not None:
            raise ValueError("kl_coef is 0: the run has no KL term and uses no reference model (pass ref_model=None)")
        if args.uses_reference and ref_model is None and not isinstance(model, PeftModel):
            raise ValueError("ref_model is required unless the policy is a peft model (then the reference is the base) or kl_coef is 0")
        disable_dropout_in_model(model)
        self.processor = processing_class
        self.reward = reward
        self.ref_model = ref_model
        # Which models read each rollout's image features instead of encoding the images (vision_features.py);
        # decided before ZeRO-3 partitions the reference, when its weights can still be compared.
        reward_models = [(m.name, m) for m in learned_reward_models(reward)]
        critic = critic_for(args, critic, model)
        critic_backbone = None if critic is None else critic.backbone
        self.sharing = plan_sharing(model, ref_model, reward_models, args.reuse_vision_features, critic=critic_backbone)
        if args.skip_long_prompts:  # the held-out prompts too: evaluation encodes them under the same limit
            train_dataset = drop_long_prompts(processing_class, train_dataset, args.max_prompt_length)
            if eval_dataset is not None:
                eval_dataset = drop_long_prompts(processing_class, eval_dataset, args.max_prompt_length, what="eval_data")
        # A run with videos calls the tower once per kind in every forward of every rank (dummy_image.py).
        expect_videos(train_dataset.has_videos() or (eval_dataset is not None and eval_dataset.has_videos()))
        if args.ddp_find_unused_parameters is None:  # every trainable parameter takes part in every backward, unless
            args.ddp_find_unused_parameters = tower_trains(model)  # a training tower misses text-only micro-batches
        super().__init__(
            model=PolicyAndValue(model, critic),
            args=args,
            processing_class=processing_class,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
        )
        use_metrics_line(self)
        check_engine(self.accelerator, fsdp=bool(args.fsdp), deepspeed=bool(args.deepspeed))
        if is_deepspeed(self.accelerator) and args.critic_warmup_steps:
            # The engine steps inside backward: the policy's gradients cannot be dropped before its step.
            raise ConfigError("critic_warmup_steps is not supported under DeepSpeed yet; use DDP, or set it to 0")
        check_deepspeed_skips_non_finite_steps(self.accelerator)
        if is_deepspeed(self.accelerator):
            configure_deepspeed(self.accelerator, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm)
        if self.ref_model is not None:
            cast_to_engine_dtype(self.ref_model, self.accelerator)  # DeepSpeed bf16 casts the policy: the reference with it
            self.ref_model = prepare_frozen(self.ref_model, self.accelerator)
        self.reward_models = [prepare_frozen(m, self.accelerator) for _, m in reward_models]  # in place, inside `reward`
        # (sharded reward models keep their batch_size: each of their forwards gathers shards, on every rank alike)
        reward_budget = None if self.sharded_training else args.max_tokens_per_micro_batch
        self.rewards = RolloutRewards(
            reward, processing_class, self.accelerator, self.sharing.reward_models, self.reward_models, args.max_unscored_fraction,
            self.sum_over_ranks, reward_budget,
        )  # fmt: skip
        tokenizer = processing_class.tokenizer
        self.eos_ids = eos_token_ids(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.generation_config = make_generation_config(tokenizer, args.max_new_tokens, temperature=args.temperature)
        self.greedy_config = make_generation_config(tokenizer, args.max_new_tokens, do_sample=False)
        # multi-turn rollouts (tools or an environment): one environment per sample and rollout
        self.multi_turn = setup_multi_turn(processing_class, family_of(model), args.tools, args.environment, args.max_turns, args.max_total_tokens)
        plan = plan_batches(args, len(train_dataset), self.accelerator.num_processes)
        self.global_batch_size, self.prompts_per_batch = plan.global_batch_size, plan.prompts_per_batch
        self.batches_per_epoch, self.num_total_batches = plan.batches_per_epoch, plan.num_total_batches
        self.eval_every = int(args.eval_steps) if args.eval_steps else max(1, self.num_total_batches // 10)
        self.skipped_in_a_row = 0
        self.too_many_skipped = False  # max_skipped_steps in a row reached: stop at the end of the iteration

    # ---- helpers -----------------------------------------------------------------------------------

    @property
    def rng_devices(self) -> list[int]:
        """The CUDA devices whose RNG streams this process draws from (for `torch.random.fork_rng`)."""
        return rng_devices(self.accelerator.device)

    @property
    def sharded_training(self) -> bool:
        """Whether the trained weights stay sharded over the ranks in a training forward (ZeRO-3, FSDP2)."""
        return is_fsdp2(self.accelerator) or zero_stage(self.accelerator) == 3

    @property
    def training_shares_prompts(self) -> bool:
        """Whether a training forward may run a prompt its rows share once: not with activation checkpointing (which
        drops the KV cache), nor under ZeRO-3 or FSDP2 (each sharded layer would run twice in one forward)."""
        return not (bool(self.args.activation_checkpointing) or self.sharded_training)

    def models_by_name(self) -> dict[str, nn.Module]:
        """The models of the run: the policy (with its critic), the reference if separate, the learned reward models."""
        models = {"policy": self.model_wrapped}
        if self.ref_model is not None:
            models["reference"] = self.ref_model
        models.update({f"reward model {m.name!r}": m for m in self.reward_models})
        return models

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over all processes (itself on one); `t` must live on `accelerator.device`."""
        return t if self.accelerator.num_processes == 1 else self.accelerator.reduce(t.clone(), reduction="sum")

    def gather_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D `values` (of any length, none negative) concatenated, on every process."""
        if self.accelerator.num_processes == 1:
            return values
        sentinel = -1e9  # below any value gathered here (entropies), as in TRL's get_high_entropy_mask
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=0, pad_index=sentinel))
        return gathered[gathered != sentinel]

    # ---- the loop ---------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainerState:
        """Every iteration from the first (or the checkpoint's) to `num_total_batches`; a final checkpoint and the
        final model in output_dir. SIGTERM/SIGINT finish the iteration, checkpoint and raise `Preempted`."""
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else self.args.resume_from_checkpoint
        checkpoint = ckpt.resolve_checkpoint(resume, self.args.output_dir)
        replaced = claim_output_dir(self.args.output_dir, self.args.overwrite_output_dir, self.accelerator) if checkpoint is None else None
        self.start_run(checkpoint)
        started, episodes_at_start = time.time(), self.state.global_step * self.global_batch_size
        with StopOnSignal() as stop:
            for iteration in range(self.state.global_step, self.num_total_batches):
                metrics = self.iteration(iteration)
                self.state.global_step = iteration + 1
                self.state.epoch = (iteration + 1) / self.batches_per_epoch
                episode = self.state.global_step * self.global_batch_size
                metrics["eps"] = (episode - episodes_at_start) / max(time.time() - started, 1e-9)
                metrics["episode"] = episode
                self.end_iteration(metrics, stop)
                if self.control.should_training_stop:
                    break
        if not self.saved_this_step():
            self.save_checkpoint()
        self.save_final(self.args.output_dir)
        if replaced is not None and self.is_world_process_zero():
            shutil.rmtree(replaced, ignore_errors=True)  # the previous run, kept aside until this one finished
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return self.state

    def start_run(self, checkpoint: Path | None) -> None:
        """Weights (from `checkpoint` if any), optimizer and schedule, the engine's `prepare`, the trainer state and
        RNG (the checkpoint's, or seeded per process), `ppo_config.yaml`; what is shared and sharded, printed."""
        args, accelerator = self.args, self.accelerator
        if checkpoint is not None:
            self.load_weights(checkpoint)
        cast_to_engine_dtype(self.model, accelerator)
        self.create_optimizer_and_scheduler(num_training_steps=self.num_total_batches)
        self.model_wrapped, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped.eval()
        self.state = TrainerState(
            stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)],
            max_steps=self.num_total_batches,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            num_train_epochs=math.ceil(self.num_total_batches / self.batches_per_epoch),
        )
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        # Each process samples with its own stream (after resuming, the saved per-process RNG state takes over).
        torch.manual_seed(args.seed + accelerator.process_index)
        if checkpoint is not None:
            self.load_training_state(checkpoint)
        if self.is_world_process_zero():
            with atomic_file(Path(args.output_dir) / CONFIG_FILE) as f:
                yaml.safe_dump(self.run_config(), f, sort_keys=True)
            console.write(self.sharing.describe())
            console.write(describe_placement(self.models_by_name(), accelerator))
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

    def iteration(self, iteration: int) -> dict[str, float]:
        """One PPO iteration: prompts, rollout, scores, advantages, optimisation, LR step; returns its metrics."""
        samples, rollout, scored = self.sample(iteration)  # 1-3
        old = {**scored, **self.advantages(rollout, scored)}  # 4-5
        if self.sum_over_ranks(old["train_mask"].any(dim=1).sum().to(self.accelerator.device)) == 0:
            logger.warning(f"iteration {iteration + 1}: no sample of the batch could be scored; the update is skipped")
            stats = {}
        else:
            stats = self.optimise(rollout, old)  # 6
        lr = self.policy_learning_rate()  # the rate this iteration's steps used (the scheduler moves on below)
        with warnings.catch_warnings():  # an iteration whose steps were all skipped still advances the schedule
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
            self.lr_scheduler.step()
        metrics = {**self.metrics(rollout, old, stats), "lr": lr}  # 7
        if self.args.num_sample_generations and self.is_world_process_zero() and (iteration + 1) % max(1, int(self.args.logging_steps)) == 0:
            show_samples(self.args.report_to, iteration + 1, samples[: self.args.num_sample_generations], old)
        return metrics

    def end_iteration(self, metrics: dict[str, float], stop: StopOnSignal) -> None:
        """Evaluate, log and checkpoint as the schedule says; on a stop signal, checkpoint and raise `Preempted`."""
        args, step = self.args, self.state.global_step
        last = step == self.num_total_batches
        if self.eval_dataset is not None and (step % self.eval_every == 0 or last):
            metrics.update(self.evaluate_policy())
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if step % max(1, int(args.logging_steps)) == 0 or last:
            self.log(metrics)
        if self.saved_this_step():
            self.save_checkpoint()
        if self.too_many_skipped:  # the same on every rank (the skip is decided over all ranks)
            path = Path(args.output_dir) / f"{ckpt.PREFIX}{step}" if self.saved_this_step() else self.save_checkpoint()
            raise NonFiniteError(
                f"{args.max_skipped_steps} optimiser steps in a row had a non-finite loss or gradient norm (skipped: they "
                f"changed nothing); stopped after iteration {step}. {path} holds the run at the end of it. Lower the "
                "learning rate, check the reward for extreme values, or try fp32/bf16 instead of fp16"
            )
        if self.stop_requested(stop):
            path = Path(args.output_dir) / f"{ckpt.PREFIX}{step}" if self.saved_this_step() else self.save_checkpoint()
            launcher = "accelerate launch [your launch flags]" if self.accelerator.num_processes > 1 else None
            raise Preempted(
                f"stopped by a signal after iteration {step}; resumable checkpoint {path}. "
                f"To resume:\n  {resume_command(str(path), launcher=launcher)}",
                stop.signum or 15,
            )

    def saved_this_step(self) -> bool:
        """Whether `save_steps` puts a checkpoint at this iteration."""
        return bool(self.args.save_steps) and self.state.global_step % int(self.args.save_steps) == 0

    # ---- the seven steps -----------------------------------------------------------------------------

    def sample(self, iteration: int) -> tuple[list[dict], Rollout, dict]:
        """Steps 1-3: this iteration's samples, their rollout and its scores. With `dynamic_sampling`, groups whose
        scores are all equal are dropped and further prompts rolled out until the batch is full
        (training/dynamic_sampling.py)."""
        if self.args.dynamic_sampling:
            return sample_with_signal(self, iteration)
        samples = self.batch_samples(iteration)
        rollout = self.make_rollout(samples)
        return samples, rollout, self.score(rollout, samples)

    def micro_batches(self, rollout: Rollout, rows: list[int], size: int) -> list[list[int]]:
        """`rows` of `rollout` in micro-batches of `size` rows, or by tokens (`max_tokens_per_micro_batch`, as many on
        every rank as the rank that needs most: one gather of the counts, issued by every rank)."""
        lengths = rollout.row_lengths()
        budget = self.args.max_tokens_per_micro_batch
        if budget is None:
            return by_count(rows, size, lengths)
        plan = by_tokens(rows, lengths, budget)
        most = int(self.accelerator.gather(torch.tensor([len(plan)], device=self.accelerator.device)).max())
        return plan if most == len(plan) else by_tokens(rows, lengths, budget, at_least=most)

    @torch.no_grad()
    def score(self, rollout: Rollout, samples: list[dict], rewards: tuple | None = None) -> dict[str, torch.Tensor | dict]:
        """Step 3: old-policy logprobs, reference logprobs (with a KL term only), values (micro-batched) and the reward
        scores (`rewards`: `RolloutRewards.score`'s result when the rewards were called already)."""
        temperature = self.args.temperature
        outputs = defaultdict(list)
        plan = self.micro_batches(rollout, list(range(len(rollout))), self.args.local_rollout_forward_batch_size)
        for rows in plan:
            mb = rollout.select(rows)
            for name, value in zip(("logprobs", "entropy", "values"), self.model_wrapped(mb, temperature, where="old-policy/value forward")):
                outputs[name].append(value)
            if self.args.uses_reference:
                outputs["ref_logprobs"].append(self.reference_logprobs(mb))
        order = torch.tensor([r for rows in plan for r in rows]).argsort().to(rollout.query_response.device)  # back to row order
        completions, columns, combined = rewards or self.rewards.score(rollout, samples)
        device = rollout.query_response.device
        unscored = torch.tensor([c is None for c in combined], device=device)  # (B,)
        self.rewards.check_coverage(columns, unscored)
        return {
            "ref_logprobs": None,  # without a KL term; else from outputs
            **{name: torch.cat(parts)[order] for name, parts in outputs.items()},  # each (B, T_r)
            "scores": torch.tensor([0.0 if c is None else float(c) for c in combined], device=device),  # (B,)
            "unscored": unscored,
            "reward_columns": columns,
            "completions": completions,
        }

    def reference_logprobs(self, mb: Rollout) -> torch.Tensor:
        """Logprobs under the model as it was when PPO started (see model_loading for the three cases)."""
        with self.accelerator.autocast():  # the same compute dtype as the policy's forwards
            if self.ref_model is not None:
                with unsharded_roots([self.ref_model], self.accelerator):
                    return response_logprobs(self.ref_model, mb, self.args.temperature, where="reference forward")[0]
            policy = self.accelerator.unwrap_model(self.model_wrapped).policy
            # (keeping_requires_grad: peft's exit would freeze a lora critic)
            with unsharded_roots([self.model_wrapped], self.accelerator), keeping_requires_grad(policy), policy.disable_adapter():
                return response_logprobs(policy, mb, self.args.temperature, where="reference forward (adapters disabled)")[0]

    def advantages(self, rollout: Rollout, scored: dict) -> dict[str, torch.Tensor]:
        """Steps 4-5: shaped per-token rewards and the advantage estimator's advantages (README: advantage estimators).

        gae: GAE over `score on the last token - kl_coef x KL per token`, whitened over the global batch.
        reinforce_pp: the same rewards' discounted return (no critic), whitened over the global batch.
        grpo/rloo: the score replaced by its group-relative advantage (each prompt's num_generations samples,
        whole on this process), then the same per-token KL penalty, and the discounted return; not whitened.
        With kl_in_loss the KL is not in the rewards (the loss carries it); without a KL term (kl_coef 0) there is
        no reference and `kl` is None.
        Unscored samples are left out (`train_mask` is False on all their tokens): they get no reward,
        no advantage, no share of the group or whitening statistics and no loss. `loss_mask` is `train_mask` less
        the truncated responses with mask_truncated_completions (which still count in their group's statistics).
        Multi-turn: observation tokens are outside `response_mask`, so GAE and the returns pass over them (they are
        not steps); an environment's per-turn rewards add on each turn's last token (gae, reinforce_pp) or into the
        score a group compares (grpo, rloo).
        """
        args = self.args
        estimator = args.advantage_estimator
        mask = rollout.response_mask  # (B, T_r)
        scored_rows = ~scored["unscored"]  # (B,)
        train_mask = mask & scored_rows[:, None]  # (B, T_r)
        scores = self.outcome_scores(scored["scores"], rollout.has_eos)  # (B,)
        kl = None
        if args.uses_reference:
            kl = torch.where(mask, kl_penalty(scored["logprobs"], scored["ref_logprobs"], args.kl_estimator), 0.0)  # (B, T_r)
        outcome = scores  # (B,) what lands on the last token
        turn_rewards = rollout.turn_rewards()  # (B, T_r) a multi-turn environment's, on each turn's last token
        group_scores = scores if turn_rewards is None else scores + turn_rewards.sum(1)  # (B,) what a group compares
        if estimator == "grpo":
            outcome = grpo_advantages(group_scores, scored_rows, args.num_generations, args.scale_rewards, all_reduce_sum=self.sum_over_ranks)
        elif estimator == "rloo":
            outcome = rloo_advantages(group_scores, scored_rows, args.num_generations)
        kl_reward = torch.zeros_like(mask, dtype=scores.dtype) if kl is None else kl  # (B, T_r)
        rewards = shape_rewards(outcome, kl_reward, train_mask, self.reward_kl_coef)  # (B, T_r)
        if turn_rewards is not None and estimator not in GROUP_ESTIMATORS:  # (the group estimators' outcome holds them)
            rewards = rewards + torch.where(train_mask, turn_rewards, 0.0)
        if estimator == "gae":
            if args.whiten_rewards:
                rewards = whiten(rewards, train_mask, shift_mean=False, all_reduce_sum=self.sum_over_ranks)
            advantages, returns = compute_gae(rewards, scored["values"], train_mask, args.gamma, args.lam)
        else:  # critic-free: the return is the advantage (no value to subtract, none to learn)
            advantages = returns = discounted_returns(rewards, train_mask, args.gamma)
        if estimator in ("gae", "reinforce_pp"):
            advantages = whiten(advantages, train_mask, all_reduce_sum=self.sum_over_ranks)
        loss_mask = train_mask & rollout.has_eos[:, None] if args.mask_truncated_completions else train_mask  # (B, T_r)
        return {"kl": kl, "scores": scores, "train_mask": train_mask, "loss_mask": loss_mask, "advantages": advantages, "returns": returns}

    def outcome_scores(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """The score each sample's advantage starts from `(B,)`: minus `missing_eos_penalty` without an eos."""
        if self.args.missing_eos_penalty is None:
            return scores
        return scores - self.args.missing_eos_penalty * (~has_eos).float()

    @property
    def reward_kl_coef(self) -> float:
        """The KL penalty's weight in the per-token reward: 0 when it is in the loss (kl_in_loss)."""
        return 0.0 if self.args.kl_in_loss else self.args.kl_coef

    def training_policy(self) -> bool:
        """False during the critic warm-up (the first `critic_warmup_steps` iterations): only the value head learns."""
        return self.state.global_step >= self.args.critic_warmup_steps

    def optimise(self, rollout: Rollout, old: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Step 6: num_ppo_epochs x mini-batches, one optimiser step per mini-batch."""
        stats = defaultdict(list)
        if not self.training_shares_prompts:  # each training forward runs every row whole: planned so too
            rollout = replace(rollout, prompt_ids=None)
        self.model_wrapped.train()
        stopped = False
        for _ in range(self.args.num_ppo_epochs):
            order = torch.randperm(len(rollout))
            for start in range(0, len(rollout), self.args.local_mini_batch_size):
                approxkl = self.optimiser_step(rollout, old, order[start : start + self.args.local_mini_batch_size], stats)
                stopped = past_target_kl(approxkl, self.args.target_kl)
                if stopped:
                    break
            if stopped:
                break
        if self.args.target_kl is not None:
            stats["train/stopped_early"].append(torch.tensor(float(stopped), device=self.accelerator.device))
        self.model_wrapped.eval()
        return stats

    def optimiser_step(self, rollout: Rollout, old: dict[str, torch.Tensor], mini: torch.Tensor, stats: dict) -> float | None:
        """One optimiser step on the mini-batch `mini`: its micro-batches' gradients accumulated without
        synchronising, each micro-batch's loss its share of the mini-batch's (normalised by the mini-batch's counts on
        all ranks, as the loss type says), then one all-reduce, one clip and one step (skipped when the loss or the
        gradient norm is not finite). Returns, with `target_kl` set, the mini-batch's approximate KL to the rollout
        policy over all ranks (the mean of its micro-batches'; 0 when nothing took part in the loss), else None."""
        args, accelerator = self.args, self.accelerator
        micro_batches = self.micro_batches(rollout, mini.tolist(), args.per_device_train_batch_size)
        counts = torch.stack([old["loss_mask"][mini].sum(), (~old["unscored"][mini]).sum()]).float().to(accelerator.device)
        tokens, sequences = self.sum_over_ranks(counts)
        if tokens == 0:  # no sample of this mini-batch takes part in the loss (unscored, or masked), on any rank
            return None if args.target_kl is None else 0.0
        measured = len(stats["policy/approxkl_avg"])
        normaliser = LossNormaliser(tokens=tokens, sequences=sequences, local_batches=len(micro_batches) * accelerator.num_processes)
        totals = torch.zeros(2, device=accelerator.device)  # this rank's share of the mini-batch's policy and value losses
        finite = True
        # DeepSpeed accumulates and steps itself: it is told where the mini-batch ends.
        deepspeed = is_deepspeed(accelerator)
        for k, micro in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            if deepspeed:
                accelerator.gradient_state._set_sync_gradients(last)
            with nullcontext() if last or deepspeed else accelerator.no_sync(self.model_wrapped):
                losses, loss_finite = self.micro_batch_backward(rollout, old, micro, normaliser, stats)
            totals += losses
            finite &= loss_finite
        if not self.training_policy():  # warm-up: the policy keeps its weights (and AdamW skips parameters without a gradient)
            wrapped = self.accelerator.unwrap_model(self.model_wrapped)
            critic_names = wrapped.critic_parameter_names()
            for name, p in wrapped.named_parameters():
                if name not in critic_names:
                    p.grad = None
        self.apply_step(totals, finite, stats)
        if args.target_kl is None:
            return None
        kls = stats["policy/approxkl_avg"][measured:]  # this mini-batch's micro-batches on this rank
        local = torch.stack([torch.stack(kls).float().sum(), torch.tensor(float(len(kls)))]) if kls else torch.zeros(2)
        total, count = self.sum_over_ranks(local.to(accelerator.device)).tolist()  # every rank, whatever its data
        return total / count if count else 0.0

    def micro_batch_backward(self, rollout: Rollout, old: dict, idx: list[int], normaliser: LossNormaliser, stats: dict) -> tuple[torch.Tensor, bool]:
        """One training forward and backward over the micro-batch `idx`: the policy loss of `args.policy_objective`
        (weight 0 during the critic warm-up; with top_entropy_quantile < 1 on the micro-batch's highest-entropy tokens,
        the quantile taken over all ranks' micro-batches, as TRL does) plus `vf_coef` x the clipped value loss, each
        this micro-batch's share of the mini-batch's loss. Returns (this share's policy and value losses, whether the
        loss is finite)."""
        args, accelerator = self.args, self.accelerator
        mb = rollout.select(idx)
        mask = old["loss_mask"][idx]  # (b, T_r)
        logprobs, entropy, values = self.model_wrapped(mb, args.temperature, where="training forward")
        objective = args.policy_objective
        top_entropy = None
        if args.top_entropy_quantile < 1:
            top_entropy = high_entropy_mask(entropy, mask, args.top_entropy_quantile, gather=self.gather_over_ranks)
        ref_logprobs = old["ref_logprobs"][idx] if objective.kl_coef else None
        pg_loss, pg_stats = policy_loss(
            logprobs, old["logprobs"][idx], old["advantages"][idx], mask, objective, normaliser,
            ref_logprobs=ref_logprobs, entropy=entropy, entropy_mask=top_entropy,
        )  # fmt: skip
        # Critic warm-up: the policy loss stays in the graph with weight 0 (every parameter takes part, so DDP works
        # without find_unused_parameters); the policy's gradients (the value loss's, through a shared backbone) are
        # dropped before the step.
        loss = (1.0 if self.training_policy() else 0.0) * pg_loss
        vf_loss = torch.zeros((), device=accelerator.device)
        if args.uses_critic:  # critic-free estimators have no value head and no value loss
            vf_loss, vf_stats = value_loss(
                values, old["values"][idx], old["returns"][idx], mask, args.cliprange_value, args.loss_type, normaliser, args.max_new_tokens
            )
            loss = loss + args.vf_coef * vf_loss
        # DDP averages gradients over ranks, DeepSpeed also divides by gradient_accumulation_steps: the shares already
        # add up to the whole mini-batch's loss over all ranks.
        scale = accelerator.num_processes * (args.gradient_accumulation_steps if is_deepspeed(accelerator) else 1)
        accelerator.backward(loss * scale)
        if mask.any():
            stats["policy/approxkl_avg"].append(pg_stats["approxkl"])
            stats["policy/clipfrac_avg"].append(pg_stats["clipfrac"])
            stats["policy/clipfrac_low"].append(pg_stats["clipfrac_low"])
            stats["policy/clipfrac_high"].append(pg_stats["clipfrac_high"])
            if args.uses_critic:
                stats["val/clipfrac_avg"].append(vf_stats["clipfrac"])
            stats["policy/entropy_avg"].append(masked_mean(entropy.detach(), mask))
            stats["val/ratio"].append(pg_stats["ratio"])
        return torch.stack([pg_loss.detach(), vf_loss.detach()]), bool(torch.isfinite(loss))

    def apply_step(self, totals: torch.Tensor, finite: bool, stats: dict) -> None:
        """Clip the accumulated gradients and step, or skip the step when any rank's loss or the gradient norm is not
        finite; record the step's losses and gradient norm."""
        args, accelerator = self.args, self.accelerator
        device = accelerator.device
        # Under DeepSpeed the engine has clipped and stepped already (at the last backward); this reads its norm.
        grad_norm = accelerator.clip_grad_norm_(self.model_wrapped.parameters(), args.max_grad_norm or math.inf)
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm or 0.0)
        not_finite = self.sum_over_ranks(torch.tensor(float(not finite), device=device)) > 0
        if not_finite or not torch.isfinite(grad_norm):
            if is_deepspeed(accelerator) and self.model_wrapped.was_step_applied():
                raise NonFiniteError(
                    f"iteration {self.state.global_step + 1}: DeepSpeed applied an optimizer step whose loss or gradient "
                    f"norm ({float(grad_norm)}) was not finite (its overflow check is off in this configuration): the "
                    "weights are no longer usable. Resume from the last checkpoint with ZeRO stage 1-3 or bf16"
                )
            self.optimizer.zero_grad()
            self.skip_step(grad_norm)
            stats["train/skipped_steps"].append(torch.ones((), device=device))
            return
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.skipped_in_a_row = 0
        # Logged as the mean over ranks, so each rank reports its share x ranks: the mean is the mini-batch's loss.
        stats["loss/policy_avg"].append(totals[0] * accelerator.num_processes)
        if args.uses_critic:
            stats["loss/value_avg"].append(totals[1] * accelerator.num_processes)
        stats["train/grad_norm"].append(grad_norm.detach().float())
        stats["train/skipped_steps"].append(torch.zeros((), device=device))

    def skip_step(self, grad_norm: torch.Tensor) -> None:
        """Count a skipped step (it changes nothing); after `max_skipped_steps` in a row the run stops at the end of
        this iteration (`end_iteration`), where its checkpoint is the one its name says."""
        self.skipped_in_a_row += 1
        self.too_many_skipped |= self.skipped_in_a_row >= self.args.max_skipped_steps
        logger.warning(
            f"iteration {self.state.global_step + 1}: non-finite loss or gradient norm ({float(grad_norm)}); optimiser step "
            f"skipped ({self.skipped_in_a_row} in a row, at most {self.args.max_skipped_steps})"
        )

    def metrics(self, rollout: Rollout, old: dict, stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Step 7: TRL's PPO metric names over all processes (metrics.py: one collective, the same on every rank)."""
        return iteration_metrics(rollout, old, stats, self.step_stat_names, self.reward_kl_coef, self.sum_over_ranks, self.accelerator.device)

    @property
    def step_stat_names(self) -> tuple[str, ...]:
        """The statistics `optimise` records, fixed by the config (the critic-free estimators have no value loss)."""
        names = (
            "policy/approxkl_avg", "policy/clipfrac_avg", "policy/clipfrac_low", "policy/clipfrac_high", "policy/entropy_avg",
            "val/ratio", "loss/policy_avg", "train/grad_norm", "train/skipped_steps",
        )  # fmt: skip
        names += ("val/clipfrac_avg", "loss/value_avg") if self.args.uses_critic else ()
        return names + (("train/stopped_early",) if self.args.target_kl is not None else ())

    @torch.no_grad()
    def evaluate_policy(self) -> dict[str, float]:
        """The policy on the first `eval_num_samples` held-out prompts (split over the processes), sampled at the
        rollout temperature and greedily: the mean reward of each and (with a reference) the KL to it per sequence.

        Runs on its own RNG stream, seeded by the step, so evaluating changes nothing in training and a resumed
        run evaluates as the uninterrupted one did."""
        args, accelerator = self.args, self.accelerator
        per_rank = min(args.eval_num_samples, len(self.eval_dataset)) // accelerator.num_processes
        first = accelerator.process_index * per_rank
        samples = [self.eval_dataset[i] for i in range(first, first + per_rank)]
        model = accelerator.unwrap_model(self.model_wrapped)  # ranks may run different numbers of forwards
        device = accelerator.device
        out = {}
        with torch.random.fork_rng(devices=self.rng_devices):
            torch.manual_seed(args.seed + self.state.global_step)
            for name, config in (("", self.generation_config), ("_greedy", self.greedy_config)):
                totals = torch.zeros(4, dtype=torch.float64, device=device)  # scores, scored samples, KL, samples
                for start in range(0, len(samples), args.local_rollout_forward_batch_size):
                    batch = samples[start : start + args.local_rollout_forward_batch_size]
                    rollout = self.make_rollout(batch, config)
                    _, _, combined = self.rewards.score(rollout, batch)
                    kl = torch.zeros(len(batch), device=device)  # (b,)
                    if args.uses_reference:
                        logprobs = model(rollout, args.temperature, where="eval forward")[0]
                        kl = torch.where(rollout.response_mask, logprobs - self.reference_logprobs(rollout), 0.0).sum(1)
                    scored = [float(c) for c in combined if c is not None]
                    totals += torch.tensor([sum(scored), len(scored), float(kl.sum()), len(batch)], dtype=torch.float64, device=device)
                scores, n_scored, kl, n = self.sum_over_ranks(totals).tolist()
                if n_scored:  # nothing scored: the metric is missing (as metrics.py leaves it), not nan
                    out[f"eval/scores{name}"] = scores / n_scored
                if args.uses_reference:
                    out[f"eval/kl{name}"] = kl / max(n, 1)
        return out

    def stop_requested(self, stop: StopOnSignal) -> bool:
        """True on every rank as soon as any rank received SIGTERM/SIGINT."""
        flag = torch.tensor(float(stop.signum is not None), device=self.accelerator.device)
        return bool(self.sum_over_ranks(flag) > 0)
