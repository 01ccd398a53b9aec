"""Steps 1-2 of a PPO iteration for PPOTrainer: this process's prompts of the batch and their rollout (one batched
`generate`, each distinct prompt prefilled once, each distinct image and video encoded once; or the turns of a
multi-turn rollout with tools or an environment)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from trl.models.utils import unwrap_model_for_generation

from vlm_rl.data.prompts import distinct_prompts, encode_prompts, model_inputs
from vlm_rl.errors import ConfigError
from vlm_rl.models.families import family_of
from vlm_rl.models.sharding import is_fsdp2, unsharded_roots, zero_stage
from vlm_rl.models.vision_features import ImageFeatures, encode_images, encode_videos, tower_trains
from vlm_rl.rollout.batch import Rollout
from vlm_rl.rollout.generation import generate_responses
from vlm_rl.rollout.integrity import check_model_inputs
from vlm_rl.rollout.multi_turn import multi_turn_rollout


class RolloutMixin:
    """PPOTrainer's rollout (a transformers Trainer with `model_wrapped`, `processor`, `train_dataset`, `sharing`,
    `multi_turn`, `generation_config`, `eos_ids`, `pad_id` and `sum_over_ranks`)."""

    def batch_samples(self, iteration: int, round: int = 0) -> list[dict]:
        """This process's samples for PPO iteration `iteration`: local_batch_size / num_generations prompts, each
        repeated num_generations times in a row (a group, whole on this process), taken from a fixed shuffle per
        epoch, so resuming replays it. Dynamic sampling's further rounds take the prompts of the epoch's next
        batches (`round` batches on, wrapping round)."""
        generations = self.args.num_generations
        prompts = self.args.local_batch_size // generations
        epoch, k = divmod(iteration, self.batches_per_epoch)
        k = (k + round) % self.batches_per_epoch
        order = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        start = k * self.prompts_per_batch + self.accelerator.process_index * prompts
        chosen = [self.train_dataset[int(i)] for i in order[start : start + prompts]]
        return [dict(sample) for sample in chosen for _ in range(generations)]

    @contextmanager
    def generating(self):
        """The policy as `generate` runs it (gathered under ZeRO-3 unless told not to, in the forwards' autocast), and
        whether its weights stay sharded (then every rank runs every decoding step: `synced_gpus`)."""
        gather = self.args.ds3_gather_for_generation
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=gather, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as unwrapped, unsharded_roots([self.model_wrapped], self.accelerator), self.accelerator.autocast():
            # (autocast: sample from the distribution the bf16 forwards compute)
            yield unwrapped.policy, is_fsdp2(self.accelerator) or (zero_stage(self.accelerator) == 3 and not gather)

    @torch.no_grad()
    def make_rollout(self, samples: list[dict], generation_config=None) -> Rollout:
        """Steps 1-2: encode the prompts (left-padded; each distinct prompt once) and generate all responses in one
        batched call (with the rollout's sampling config unless another is given), each distinct prompt prefilled
        once. Draws one number from this process's RNG stream (generate's seed), whatever the batch and decoding.
        With tools or an environment, the turns of `multi_turn_rollout` instead."""
        if self.multi_turn is not None:
            return self.make_multi_turn_rollout(samples, generation_config)
        first, rows = distinct_prompts(samples) if self.args.share_prompts else (range(len(samples)), None)
        if self.args.share_prompts and self.accelerator.num_processes > 1:
            # Sharing runs other forwards (a prefill, a prompt pass): over sharded weights each forward is a sequence
            # of collectives, so every rank shares (rows of its own prompts where none repeat) or none does.
            anywhere = self.sum_over_ranks(torch.tensor(float(rows is not None), device=self.accelerator.device))
            if anywhere.item() > 0 and rows is None:
                rows = list(range(len(samples)))
        query = encode_prompts(self.processor, [samples[i] for i in first], self.args.max_prompt_length)
        query = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in query.items()}
        rows = None if rows is None else torch.tensor(rows, device=self.accelerator.device)
        generate_inputs = model_inputs(query)
        sources = [s["_source"] for s in samples]
        with self.generating() as (policy, synced):
            check_model_inputs(policy, generate_inputs, query["num_images"], [sources[i] for i in first], "rollout generate", query.get("num_videos"))
            features, video_features = self.encode_images(policy, query)
            config = generation_config or self.generation_config
            seed = int(torch.randint(2**62, ()))  # this rank's stream moves on by one draw, however long decoding runs
            responses = generate_responses(
                policy, generate_inputs, config, synced_gpus=synced, image_features=features, seed=seed, video_features=video_features, rows=rows
            )
        family = family_of(policy)
        return Rollout.from_generation(
            query, responses, self.eos_ids, self.pad_id, sources, family, image_features=features, video_features=video_features, rows=rows
        )

    def make_multi_turn_rollout(self, samples: list[dict], generation_config=None) -> Rollout:
        """Up to max_turns turns per sample (rollout/multi_turn.py), each a batched generate over the samples still
        running, on every rank as many as the rank that needs most. Draws one number from this process's RNG stream."""
        setting, device = self.multi_turn, self.accelerator.device
        if any(s.get("videos") for s in samples):
            raise ConfigError("tools/environment: multi-turn rollouts take prompts with images, not videos (yet); drop the video rows or the tools")
        query = encode_prompts(self.processor, samples, self.args.max_prompt_length, tools=setting.tools)
        query = {k: v.to(device) if torch.is_tensor(v) else v for k, v in query.items()}
        any_over_ranks = lambda flag: bool(self.sum_over_ranks(torch.tensor(float(flag), device=device)) > 0)  # noqa: E731
        with self.generating() as (policy, synced):
            seed = int(torch.randint(2**62, ()))
            return multi_turn_rollout(
                policy, self.processor, samples, query, setting.make_environment, generation_config or self.generation_config,
                setting.limits, family=family_of(policy), eos_ids=self.eos_ids, pad_id=self.pad_id, tools=setting.tools,
                encode=lambda images: self.encode_images(policy, {"input_ids": query["input_ids"], **images})[0],
                synced_gpus=synced, seed=seed, any_over_ranks=any_over_ranks,
            )  # fmt: skip

    def encode_images(self, policy: nn.Module, query: dict) -> tuple[ImageFeatures | None, ImageFeatures | None]:
        """Each distinct image and each distinct video of the batch through the policy's vision tower once, for every later
        forward of the rollout that may use the features exactly (generate, old policy, value, reference, reward model,
        training epochs): (image features, video features; None for a batch without video)."""
        if not self.sharing.enabled or tower_trains(policy):
            return None, None
        device = query["input_ids"].device
        images = encode_images(
            policy, query.get("pixel_values"), query.get("image_grid_thw"), self.sharing.towers, device, deduplicate=self.args.share_prompts
        )
        return images, encode_videos(policy, query, self.sharing.towers, device, deduplicate=self.args.share_prompts)
