"""PPOTrainer: rollout -> score -> advantages -> PPO epochs, orchestrated with accelerate.

Built on transformers' Trainer for what users expect of a TRL trainer (report_to, callbacks, the progress
bar, TrainerState and trainer_state.json, checkpoint rotation, RNG state) and on TRL's utilities for the
rest. The math lives in advantages.py and losses.py; this file only wires it together.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import rotate_checkpoints
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model

from vlm_rl.advantages import compute_gae, kl_penalty, shape_rewards, whiten
from vlm_rl.atomic import atomic_dir
from vlm_rl.config import PPOConfig
from vlm_rl.data import PromptDataset, reward_kwargs
from vlm_rl.integrity import check_model_inputs
from vlm_rl.generation import eos_token_ids, generate_responses, make_generation_config, pad_token_id
from vlm_rl.logprobs import response_logprobs
from vlm_rl.losses import policy_loss, value_loss
from vlm_rl.masking import masked_mean
from vlm_rl.rollout import PromptTooLongError, Rollout, encode_prompts
from vlm_rl.value_head import PolicyAndValue, ValueHead, hidden_size_of, load_value_head, save_value_head

class PPOTrainer(Trainer):
    """PPO with a shared-backbone value head for Qwen2-VL; `accelerate launch` it like any TRL trainer."""

    def __init__(
        self,
        args: PPOConfig,
        processing_class,
        model: nn.Module,
        ref_model: nn.Module | None,
        reward,
        train_dataset: PromptDataset,
        value_head: ValueHead | None = None,
        callbacks=None,
    ):
        if ref_model is None and not isinstance(model, PeftModel):
            raise ValueError("ref_model is required unless the policy is a peft model (then the reference is the base)")
        disable_dropout_in_model(model)
        self.processor = processing_class
        self.reward = reward
        self.ref_model = ref_model
        value_head = value_head if value_head is not None else ValueHead(hidden_size_of(model))
        super().__init__(
            model=PolicyAndValue(model, value_head),
            args=args,
            processing_class=processing_class,
            train_dataset=train_dataset,
            callbacks=callbacks,
        )
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)
        tokenizer = processing_class.tokenizer
        self.eos_ids = eos_token_ids(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.generation_config = make_generation_config(tokenizer, args.max_new_tokens, temperature=args.temperature)
        self.global_batch_size = args.local_batch_size * self.accelerator.num_processes
        self.batches_per_epoch = len(train_dataset) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(train_dataset)} prompts, fewer than one batch of {self.global_batch_size} "
                "(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches x processes)"
            )
        total_episodes = args.total_episodes or int(args.num_train_epochs * len(train_dataset))
        self.num_total_batches = math.ceil(total_episodes / self.global_batch_size)

    # ---- data -------------------------------------------------------------------------------------

    def batch_samples(self, iteration: int) -> list[dict]:
        """This process's prompts for PPO iteration `iteration`: a fixed shuffle per epoch, so resuming replays it."""
        epoch, k = divmod(iteration, self.batches_per_epoch)
        order = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        start = k * self.global_batch_size + self.accelerator.process_index * self.args.local_batch_size
        return [self.train_dataset[int(i)] for i in order[start : start + self.args.local_batch_size]]

    def encode(self, samples: list[dict]) -> tuple[dict, list[dict]]:
        try:
            return encode_prompts(self.processor, samples, self.args.max_prompt_length), samples
        except PromptTooLongError:
            if not self.args.skip_long_prompts:
                raise
        kept = [s for s in samples if len(encode_prompts(self.processor, [s])["input_ids"][0]) <= self.args.max_prompt_length]
        if not kept:
            raise PromptTooLongError(f"every prompt of this batch exceeds max_prompt_length={self.args.max_prompt_length}")
        return encode_prompts(self.processor, kept, self.args.max_prompt_length), kept

    # ---- one PPO iteration --------------------------------------------------------------------------

    @torch.no_grad()
    def make_rollout(self, samples: list[dict]) -> tuple[Rollout, list[dict]]:
        """Steps 1-2: encode the prompts (left-padded) and generate all responses in one batched call."""
        query, samples = self.encode(samples)
        query = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in query.items()}
        generate_inputs = {k: v for k, v in query.items() if k != "num_images"}
        sources = [s["_source"] for s in samples]
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as unwrapped:
            check_model_inputs(unwrapped.policy, generate_inputs, query["num_images"], sources, "rollout generate")
            responses = generate_responses(unwrapped.policy, generate_inputs, self.generation_config)  # (B, T_r)
        return Rollout.from_generation(query, responses, self.eos_ids, self.pad_id, sources), samples

    @torch.no_grad()
    def score(self, rollout: Rollout, samples: list[dict]) -> dict[str, torch.Tensor | dict]:
        """Step 3: old-policy logprobs, reference logprobs, values (micro-batched) and the reward scores."""
        temperature = self.args.temperature
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        step = self.args.local_rollout_forward_batch_size
        for start in range(0, len(rollout), step):
            mb = rollout.select(range(start, min(start + step, len(rollout))))
            lp, ent, v = self.model_wrapped(mb, temperature, where="old-policy/value forward")
            logprobs.append(lp)
            entropy.append(ent)
            values.append(v)
            ref_logprobs.append(self.reference_logprobs(mb))
        completions = self.processor.batch_decode(rollout.responses, skip_special_tokens=True)
        columns, combined = self.reward.score([s["prompt"] for s in samples], completions, **reward_kwargs(samples))
        device = rollout.query_response.device
        unscored = torch.tensor([c is None for c in combined], device=device)
        scores = torch.tensor([0.0 if c is None else float(c) for c in combined], device=device)  # (B,)
        return {
            "logprobs": torch.cat(logprobs),  # (B, T_r)
            "ref_logprobs": torch.cat(ref_logprobs),  # (B, T_r)
            "values": torch.cat(values),  # (B, T_r)
            "entropy": torch.cat(entropy),  # (B, T_r)
            "scores": scores,
            "unscored": unscored,
            "reward_columns": columns,
            "completions": completions,
        }

    def reference_logprobs(self, mb: Rollout) -> torch.Tensor:
        """Logprobs under the model as it was when PPO started (see model_loading for the three cases)."""
        if self.ref_model is not None:
            return response_logprobs(self.ref_model, mb, self.args.temperature, where="reference forward")[0]
        policy = self.accelerator.unwrap_model(self.model_wrapped).policy
        with policy.disable_adapter():
            return response_logprobs(policy, mb, self.args.temperature, where="reference forward (adapters disabled)")[0]

    def advantages(self, rollout: Rollout, scored: dict) -> dict[str, torch.Tensor]:
        """Steps 4-5: shaped per-token rewards, GAE, whitened advantages."""
        args = self.args
        mask = rollout.response_mask  # (B, T_r)
        scores = scored["scores"]
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~rollout.has_eos).float()
        kl = torch.where(mask, kl_penalty(scored["logprobs"], scored["ref_logprobs"], args.kl_estimator), 0.0)  # (B, T_r)
        rewards = shape_rewards(scores, kl, mask, args.kl_coef)  # (B, T_r)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, scored["values"], mask, args.gamma, args.lam)
        return {"kl": kl, "scores": scores, "advantages": whiten(advantages, mask), "returns": returns}

    def optimise(self, rollout: Rollout, old: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Step 6: num_ppo_epochs x mini-batches x gradient-accumulated micro-batches."""
        args = self.args
        stats = defaultdict(list)
        self.model_wrapped.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(rollout))
            for mini_start in range(0, len(rollout), args.local_mini_batch_size):
                mini = order[mini_start : mini_start + args.local_mini_batch_size]
                for micro_start in range(0, len(mini), args.per_device_train_batch_size):
                    idx = mini[micro_start : micro_start + args.per_device_train_batch_size].tolist()
                    mb = rollout.select(idx)
                    with self.accelerator.accumulate(self.model_wrapped):
                        logprobs, entropy, values = self.model_wrapped(mb, args.temperature, where="training forward")
                        pg_loss, pg_stats = policy_loss(logprobs, old["logprobs"][idx], old["advantages"][idx], mb.response_mask, args.cliprange)
                        vf_loss, vf_stats = value_loss(values, old["values"][idx], old["returns"][idx], mb.response_mask, args.cliprange_value)
                        loss = pg_loss + args.vf_coef * vf_loss
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients and args.max_grad_norm is not None and args.max_grad_norm > 0:
                            self.accelerator.clip_grad_norm_(self.model_wrapped.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    stats["policy/approxkl_avg"].append(pg_stats["approxkl"])
                    stats["policy/clipfrac_avg"].append(pg_stats["clipfrac"])
                    stats["loss/policy_avg"].append(pg_loss.detach())
                    stats["loss/value_avg"].append(vf_loss.detach())
                    stats["val/clipfrac_avg"].append(vf_stats["clipfrac"])
                    stats["policy/entropy_avg"].append(masked_mean(entropy.detach(), mb.response_mask))
                    stats["val/ratio"].append(pg_stats["ratio"])
        self.model_wrapped.eval()
        return stats

    # ---- the loop ---------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        args = self.args
        accelerator = self.accelerator
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
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint)
        # Each process samples with its own stream (after resuming, the saved per-process RNG state takes over).
        torch.manual_seed(args.seed + accelerator.process_index)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start_time = time.time()
        episodes_at_start = self.state.global_step * self.global_batch_size

        for iteration in range(self.state.global_step, self.num_total_batches):
            samples = self.batch_samples(iteration)
            rollout, samples = self.make_rollout(samples)
            scored = self.score(rollout, samples)
            old = {**scored, **self.advantages(rollout, scored)}
            stats = self.optimise(rollout, old)
            self.lr_scheduler.step()

            self.state.global_step = iteration + 1
            self.state.epoch = (iteration + 1) / self.batches_per_epoch
            episode = self.state.global_step * self.global_batch_size
            metrics = self.metrics(rollout, old, stats)
            metrics["eps"] = (episode - episodes_at_start) / max(time.time() - start_time, 1e-9)
            metrics["episode"] = episode
            metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.state.global_step % max(1, int(args.logging_steps)) == 0 or self.state.global_step == self.num_total_batches:
                self.log(metrics)
                if args.num_sample_generations and self.is_world_process_zero():
                    self.print_samples(samples, old)
            if args.save_steps and self.state.global_step % int(args.save_steps) == 0:
                self.save_checkpoint()
            if self.control.should_training_stop:
                break

        if not (args.save_steps and self.state.global_step % int(args.save_steps) == 0):
            self.save_checkpoint()
        self.save_final(args.output_dir)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return self.state

    def metrics(self, rollout: Rollout, old: dict, stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """TRL's PPO metric names, averaged over processes. KL and entropy are per sequence (summed over tokens)."""
        gather = lambda t: self.accelerator.gather_for_metrics(t.detach().float().reshape(-1)).mean().item()  # noqa: E731
        mask = rollout.response_mask
        non_score = (-self.args.kl_coef * old["kl"]).sum(1)  # (B,)
        out = {
            "objective/kl": gather(old["kl"].sum(1)),
            "objective/entropy": gather(old["entropy"].sum(1)),
            "objective/non_score_reward": gather(non_score),
            "objective/rlhf_reward": gather(old["scores"] + non_score),
            "objective/scores": gather(old["scores"]),
            "objective/unscored": gather(old["unscored"]),
            "val/num_eos_tokens": gather(rollout.has_eos.sum()) * self.accelerator.num_processes,
            "val/response_length": gather(mask.sum(1)),
        }
        for name, column in old["reward_columns"].items():
            values = [v for v in column if v is not None]
            out[f"objective/scores/{name}"] = gather(torch.tensor(sum(values) / len(values) if values else float("nan")))
        for name, values in stats.items():
            out[name] = gather(torch.stack(values).mean())
        ratios = torch.stack(stats["val/ratio"])
        out["val/ratio_var"] = gather(ratios.var() if len(ratios) > 1 else torch.zeros(()))
        return out

    def print_samples(self, samples: list[dict], old: dict) -> None:
        from vlm_rl.data import prompt_text

        for s, completion, score in list(zip(samples, old["completions"], old["scores"].tolist()))[: self.args.num_sample_generations]:
            print(f"[{self.state.global_step}] {prompt_text(s['prompt'])!r} -> {completion!r} (score {score:+.3f})")

    # ---- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """`output_dir/checkpoint-N/`: the policy (full or adapter), value head, processor, optimizer, scheduler, RNG, state."""
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            with atomic_dir(path) as tmp:
                self.save_model_files(tmp)
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                self.state.save_to_json(str(tmp / "trainer_state.json"))
                self._save_rng_state(str(tmp))
            rotate_checkpoints(self.args.output_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()
        return path

    def save_model_files(self, directory: Path) -> None:
        wrapped = self.accelerator.unwrap_model(self.model_wrapped)
        wrapped.policy.save_pretrained(directory, safe_serialization=True)
        save_value_head(wrapped.value_head, directory)
        self.processor.save_pretrained(directory)

    def save_final(self, output_dir: str) -> None:
        """The final policy, value head, processor and trainer_state.json in `output_dir` itself (each file atomic)."""
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            out = Path(output_dir)
            with atomic_dir(out / ".final-staging") as tmp:
                self.save_model_files(tmp)
                self.state.save_to_json(str(tmp / "trainer_state.json"))
            staging = out / ".final-staging"
            for f in staging.iterdir():
                os.replace(f, out / f.name)
            staging.rmdir()
        self.accelerator.wait_for_everyone()

    def resolve_checkpoint(self, resume: str | bool | None) -> str | None:
        if not resume:
            return None
        if resume is True or resume == "True":
            candidates = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            if not candidates:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {self.args.output_dir} has no checkpoint-N directory")
            return str(candidates[-1])
        if not (Path(resume) / "trainer_state.json").exists():
            raise FileNotFoundError(f"{resume}: not a vlm-rl checkpoint (no trainer_state.json)")
        return str(resume)

    def load_checkpoint(self, checkpoint: str) -> None:
        """Restore the weights, value head, optimizer, scheduler, RNG and state saved by `save_checkpoint`."""
        wrapped = self.accelerator.unwrap_model(self.model_wrapped)
        policy = wrapped.policy
        if isinstance(policy, PeftModel):
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(policy, load_peft_weights(checkpoint, device=str(self.accelerator.device)))
        else:  # from_pretrained applies the checkpoint's key mapping (v5 saves the hub layout)
            saved = type(policy).from_pretrained(checkpoint, dtype=policy.dtype)
            policy.load_state_dict(saved.state_dict())
            del saved
        wrapped.value_head.load_state_dict(load_value_head(checkpoint, hidden_size_of(policy)).state_dict())
        self.optimizer.load_state_dict(torch.load(Path(checkpoint) / "optimizer.pt", map_location=self.accelerator.device, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))
        saved = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        self.state.global_step = saved.global_step
        self.state.epoch = saved.epoch
        self.state.log_history = saved.log_history
        self._load_rng_state(checkpoint)
