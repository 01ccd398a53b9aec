"""The policy loss of the PPO/GRPO family (loss types, clip-higher, two-sided clipping, sequence-level importance
sampling, KL and entropy in the loss) and PPO's clipped value loss.

Tensors are `(B, T)` over response tokens; `mask` is a bool `(B, T)` marking the tokens that take part. Where TRL's
`GRPOTrainer` (1.16, `_compute_loss`) defines a quantity, the definition here is its: the same names, the same
numbers for the same tensors (tests/algorithms/test_trl_oracle.py feeds both).

How a micro-batch's summed per-token loss is normalised is the loss type's (`aggregate`); `LossNormaliser` carries
the counts of the whole mini-batch (all its micro-batches, all ranks), so that the micro-batches' losses add up to
the mini-batch's whatever its split. The default, `LossNormaliser.of(mask)`, is this batch alone. Losses are
differentiable with respect to the new logprobs, values and entropies; masked positions get exactly zero gradient,
even when they hold NaN. Stats are detached scalar tensors, means over this batch's valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlm_rl.algorithms.advantages import kl_penalty
from vlm_rl.algorithms.masking import masked_mean, masked_sum

# TRL's loss types (GRPOConfig.loss_type) that vlm-rl implements; TRL's sapo, luspo and vespo it does not.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossNormaliser:
    """The counts a loss type divides by, over the whole mini-batch a micro-batch belongs to.

    tokens: the mini-batch's valid tokens on all ranks (dapo, cispo: TRL's `num_items_in_batch`);
    sequences: its sequences on all ranks (grpo: the mean over sequences; dr_grpo: sequences x max_completion_length);
    local_batches: its micro-batches x ranks (bnpo and the entropy bonus average per-micro-batch means, as TRL does
    over gradient accumulation steps and DDP over ranks).
    """

    tokens: Tensor | float
    sequences: Tensor | float
    local_batches: int = 1

    @classmethod
    def of(cls, mask: Tensor) -> LossNormaliser:
        """The counts of this batch alone (one micro-batch, one rank)."""
        return cls(tokens=mask.sum(), sequences=float(mask.shape[0]), local_batches=1)


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, normaliser: LossNormaliser, max_completion_length: int | None = None) -> Tensor:
    """This batch's share of the mini-batch loss of `per_token` `(B, T)` under `loss_type` (TRL's definitions):

    grpo: each sequence's token mean, summed, / sequences (the mean over sequences);
    bnpo: this batch's token mean / local_batches (the mean over micro-batches and ranks of their token means);
    dr_grpo: the token sum / (sequences x max_completion_length), a constant;
    dapo, cispo: the token sum / the mini-batch's valid tokens on all ranks.
    """
    total = masked_sum(per_token, mask)
    if loss_type == "grpo":
        per_sequence = masked_sum(per_token, mask, dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
        return per_sequence.sum() / normaliser.sequences
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1) / normaliser.local_batches
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo divides by max_completion_length: give it")
        return total / (normaliser.sequences * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        tokens = normaliser.tokens
        return total / (tokens.clamp(min=1) if torch.is_tensor(tokens) else max(tokens, 1))
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


@dataclass(frozen=True)
class PolicyObjective:
    """What the policy loss is: TRL GRPOConfig's fields of the same names (`epsilon_low` is its `epsilon`,
    `kl_coef` its `beta`), each with TRL's meaning.

    epsilon_high: the upper clip (clip-higher, DAPO); None = epsilon_low. For cispo, the largest importance weight.
    delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta too; None = off.
    importance_sampling_level: token, or sequence (GSPO: one ratio per sequence, the geometric mean of its tokens').
    kl_coef: the KL penalty's weight in the loss (0: none), per token, estimated with `kl_estimator` (TRL: k3),
    multiplied by the importance ratio when `use_bias_correction_kl` (TRL's default).
    entropy_coef: the entropy bonus's weight (the mean entropy of each micro-batch's tokens, subtracted).
    max_completion_length: dr_grpo's constant.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = True
    entropy_coef: float = 0.0
    max_completion_length: int | None = None

    @property
    def upper(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


def importance_log_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    """log(pi / pi_old) per token `(B, T)` ("token"), or per sequence `(B, 1)` ("sequence": the mean of the
    sequence's token log-ratios, so its ratio is their geometric mean, GSPO's s_i). `log_ratio` is 0 where masked."""
    if level == "token":
        return log_ratio
    if level == "sequence":
        return (log_ratio.sum(dim=1) / mask.sum(dim=1).clamp(min=1))[:, None]
    raise ValueError(f"unknown importance_sampling_level {level!r}; expected one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    objective: PolicyObjective,
    normaliser: LossNormaliser | None = None,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss (this batch's share of the mini-batch's, see `aggregate`) and its stats.

    Per token, with w the importance ratio (per token or per sequence) and A the advantage `(B, T)` or `(B,)`:
    clipped losses: -min(min(w, delta) A, clip(w, 1 - epsilon_low, 1 + epsilon_high) A);
    cispo: -sg(min(w, epsilon_high)) A logp (the weight clipped and detached, the gradient through logp only);
    then, on the tokens of `entropy_mask` only (TRL's top-entropy tokens; None: all), plus `kl_coef` x KL on every
    token; aggregated by the loss type; minus `entropy_coef` x the mean `entropy` over `mask & entropy_mask`
    / local_batches.

    Stats: `clipfrac` (tokens where the clipped term is the one taken), `clipfrac_low` (w < 1 - epsilon_low with
    A < 0) and `clipfrac_high` (w > 1 + epsilon_high with A > 0; cispo: w > epsilon_high with A > 0), as fractions
    of the valid tokens (a sequence-level ratio counts for each of its tokens); `approxkl` = 0.5 x mean of
    (logp - old)^2; `ratio` = mean token ratio.
    """
    normaliser = normaliser or LossNormaliser.of(mask)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)
    # Padding is zeroed before any arithmetic, so a NaN or inf there cannot reach the gradient.
    logprobs = torch.where(mask, logprobs, 0.0)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, T)
    advantages = torch.where(mask, advantages, 0.0)  # (B, T)
    ratio = torch.exp(importance_log_weights(log_ratio, mask, objective.importance_sampling_level))  # (B, T) or (B, 1)
    ratio = ratio.expand_as(mask)  # (B, T)
    if objective.loss_type == "cispo":
        weight = torch.clamp(ratio, max=objective.upper).detach()  # (B, T)
        per_token = -weight * advantages * logprobs
        taken_clipped = (ratio > objective.upper) & (advantages > 0)
        clipped_low, clipped_high = torch.zeros_like(mask), taken_clipped
    else:
        capped = ratio if objective.delta is None else torch.clamp(ratio, max=objective.delta)  # (B, T)
        clipped = torch.clamp(ratio, 1.0 - objective.epsilon_low, 1.0 + objective.upper)  # (B, T)
        per_token = -torch.minimum(capped * advantages, clipped * advantages)
        taken_clipped = clipped * advantages < capped * advantages
        clipped_low = (capped < 1.0 - objective.epsilon_low) & (advantages < 0)
        clipped_high = (capped > 1.0 + objective.upper) & (advantages > 0)
    if entropy_mask is not None:
        per_token = torch.where(entropy_mask, per_token, 0.0)
    if objective.kl_coef:
        if ref_logprobs is None:
            raise ValueError("a KL term in the loss (kl_coef > 0) needs the reference logprobs")
        kl = kl_penalty(logprobs, torch.where(mask, ref_logprobs, 0.0), objective.kl_estimator)  # (B, T)
        if objective.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + objective.kl_coef * kl
    loss = aggregate(per_token, mask, objective.loss_type, normaliser, objective.max_completion_length)
    if objective.entropy_coef:
        if entropy is None:
            raise ValueError("an entropy bonus (entropy_coef != 0) needs the entropy")
        effective = mask if entropy_mask is None else mask & entropy_mask
        loss = loss - objective.entropy_coef * masked_mean(entropy, effective) / normaliser.local_batches
    stats = {
        "clipfrac": masked_mean(taken_clipped.float(), mask).detach(),
        "clipfrac_low": masked_mean(clipped_low.float(), mask).detach(),
        "clipfrac_high": masked_mean(clipped_high.float(), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(torch.exp(log_ratio), mask).detach(),
    }
    return loss, stats


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float, gather=None) -> Tensor:
    """The tokens whose entropy is at or above the `1 - top_quantile` quantile of the valid tokens' entropies
    `(B, T)` bool (TRL's `top_entropy_quantile`, rho in "Beyond the 80/20 Rule"): 0.2 keeps the top 20%.

    `gather` (e.g. an all-gather over ranks of a 1-D tensor of any length) turns the quantile global: every rank
    thresholds with the quantile of all ranks' valid tokens. With no valid token anywhere, nothing is kept."""
    local = entropy.detach()[mask].float()
    values = local if gather is None else gather(local)
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - top_quantile)
    return (torch.where(mask, entropy.detach(), 0.0) >= threshold) & mask


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    loss_type: str = "dapo",
    normaliser: LossNormaliser | None = None,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, aggregated as the policy loss is (`loss_type`), with stat `clipfrac`.

    loss = 0.5 x aggregate of max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clamp(v - old, -c, c).
    `clipfrac` is the fraction of valid tokens where the clipped loss is the larger.
    """
    normaliser = normaliser or LossNormaliser.of(mask)
    # Padding is zeroed before any arithmetic, so a NaN or inf there cannot reach the gradient.
    values = torch.where(mask, values, 0.0)  # (B, T)
    old_values = torch.where(mask, old_values, 0.0)  # (B, T)
    returns = torch.where(mask, returns, 0.0)  # (B, T)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, loss_type, normaliser, max_completion_length)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}
    return loss, stats


EARLY_STOP_FACTOR = 1.5  # TRL's early_stopping and Stable-Baselines3's target_kl stop at 1.5 x the target


def past_target_kl(approxkl: float | None, target_kl: float | None) -> bool:
    """Whether a mini-batch whose approximate KL to the rollout policy was `approxkl` ends its iteration's
    optimisation: above EARLY_STOP_FACTOR x `target_kl`; never without a target."""
    return target_kl is not None and approxkl is not None and approxkl > EARLY_STOP_FACTOR * target_kl
