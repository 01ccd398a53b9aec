"""The rollout's rewards: the responses decoded, every reward called with the dataset's columns (and, for the learned
reward models that share the policy's vision tower, the rollout's image features), and the run stopped when the
rewards cannot score enough of a batch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from reward_models.base import CombinedReward
from reward_models.vlm_reward import scoring_by_tokens, shared_image_features
from vlm_rl.data.formats import reward_kwargs
from vlm_rl.errors import UserError
from vlm_rl.models.dummy_image import videos_expected
from vlm_rl.models.sharding import unsharded_roots
from vlm_rl.models.vision_features import FeatureLookup
from vlm_rl.rollout.batch import Rollout


class RewardCoverageError(UserError):
    """A reward returned None ("cannot score") for more of a batch than `max_unscored_fraction` allows."""


class RolloutRewards:
    """`reward` (every reward of the run, combined) as the trainer calls it on a rollout."""

    def __init__(
        self,
        reward: CombinedReward,
        processor,
        accelerator: Accelerator,
        sharing_models: list[tuple[str, nn.Module]],
        reward_models: list[nn.Module],
        max_unscored_fraction: float,
        sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
        max_tokens_per_micro_batch: int | None = None,
    ):
        self.reward = reward
        self.processor = processor
        self.accelerator = accelerator
        self.sharing_models = [m for _, m in sharing_models]  # the learned reward models that may read the features
        self.reward_models = reward_models  # every learned reward model (prepared by the engine)
        self.max_unscored_fraction = max_unscored_fraction
        self.sum_over_ranks = sum_over_ranks
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch  # the learned reward models' budget, if any

    def reading_features(self, rollout: Rollout):
        """A context in which the learned reward models that share the vision tower take the rollout's image
        features for the images they find in it (pixel for pixel) instead of encoding them again. Not in a run with
        videos: a reward model encodes its own clips (and then its pictures), the same on every rank."""
        features = rollout.image_features
        if features is None or not self.sharing_models or videos_expected():
            return nullcontext()
        return shared_image_features(self.sharing_models, FeatureLookup(rollout.per_image(), features))

    def score(self, rollout: Rollout, samples: list[dict]) -> tuple[list[str], dict[str, list], list[float | None]]:
        """(decoded completions, each reward's scores, the combined score per sample) for the rollout's responses.

        Rule rewards read the text (of a multi-turn trajectory, its last model turn); a learned reward model also needs
        to know whether each response ended."""
        if rollout.trajectories is not None:
            completions = [t.answer for t in rollout.trajectories]
        else:
            completions = self.processor.batch_decode(rollout.responses, skip_special_tokens=True)
        kwargs = {**reward_kwargs(samples), "completion_ended": rollout.has_eos.tolist()}
        budget = scoring_by_tokens(self.reward_models, self.max_tokens_per_micro_batch)
        with self.reading_features(rollout), unsharded_roots(self.reward_models, self.accelerator), budget:
            columns, combined = self.reward.score([s["prompt"] for s in samples], completions, **kwargs)
        return completions, columns, combined

    def check_coverage(self, columns: dict[str, list], unscored: torch.Tensor) -> None:
        """Stop when the rewards could not score more than `max_unscored_fraction` of the global batch."""
        device = self.accelerator.device
        n = self.sum_over_ranks(torch.tensor(float(len(unscored)), device=device))
        fraction = (self.sum_over_ranks(unscored.float().sum().to(device)) / n).item()
        if fraction <= self.max_unscored_fraction:
            return
        per_reward = {
            name: (self.sum_over_ranks(torch.tensor(float(sum(v is None for v in col)), device=device)) / n).item()
            for name, col in columns.items()
        }
        names = ", ".join(f"{name!r} returned None for {f:.0%}" for name, f in per_reward.items() if f > 0)
        raise RewardCoverageError(
            f"{fraction:.0%} of this batch could not be scored (max_unscored_fraction={self.max_unscored_fraction}): "
            f"{names}. A reward that cannot score that much of the data is broken or mismatched to it; fix the reward "
            "or the data, or raise max_unscored_fraction"
        )
