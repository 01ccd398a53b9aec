"""The per-token RL signal: KL penalty, reward shaping, GAE, the critic-free estimators and whitening.

Every tensor is `(B, T)` over response tokens and `mask` is a bool `(B, T)` marking the real ones.
Outputs are 0 wherever `mask` is False, and rows without any valid token come out all zeros.

The group estimators (GRPO, RLOO) take per-sample outcome scores `(B,)` whose `num_generations` samples of one
prompt are consecutive: rows `[g * G, (g + 1) * G)` are group g. Samples with `valid` False (unscored) take no
part in their group's statistics and get 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vlm_rl.algorithms.masking import masked_sum

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
CRITIC_FREE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")  # no value model: nothing to warm up, nothing to load
GROUP_ESTIMATORS = ("grpo", "rloo")  # need num_generations >= 2 samples per prompt
GRPO_EPS = 1e-4  # TRL GRPOTrainer's: advantages / (std + 1e-4)
SCALE_REWARDS = ("group", "batch", "none")  # TRL GRPOConfig.scale_rewards


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' logprobs.

    "k1": logp - ref (unbiased, can be negative); "k2": 0.5 * (logp - ref)^2;
    "k3": exp(ref - logp) - (ref - logp) - 1 (unbiased and never negative). Not masked.
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(-d) - 1 + d, with d = logp - ref
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def masked_moments(x: Tensor, mask: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, unbiased variance) of `x` over its valid entries; the variance is 0 with fewer than two.

    `all_reduce_sum` (e.g. a sum over ranks) turns them global: the count, the sum and the sum of squared deviations
    are summed over ranks, so every rank gets the statistics of the whole batch, as if it were on one process."""
    total = all_reduce_sum or (lambda t: t)
    count = total(mask.sum().to(x.dtype))
    mean = total(masked_sum(x, mask)) / count.clamp(min=1)
    var = total(masked_sum((x - mean) ** 2, mask)) / (count - 1).clamp(min=1)
    return count, mean, var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """`x` normalised to mean 0 and unbiased variance 1 over its valid entries; 0 where `mask` is False.

    With `shift_mean=False` the mean is added back after scaling (TRL's convention). With fewer than
    two valid entries the variance is undefined and `x` is only centred, not scaled: a single valid
    entry whitens to 0 (to itself with `shift_mean=False`).

    `all_reduce_sum` (e.g. a sum over ranks) turns the statistics global (`masked_moments`): every rank whitens
    with the statistics of the whole batch, as if it were on one process.
    """
    count, mean, var = masked_moments(x, mask, all_reduce_sum)
    inv_std = torch.where(count >= 2, torch.rsqrt(var + 1e-8), 1.0)
    whitened = (x - mean) * inv_std  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards `(B, T)`: `-kl_coef * kl` on every valid token, plus `scores[b]` on row b's last one.

    `scores` is `(B,)`. The last valid token is the last True in the row, wherever the mask's holes are.
    A row with no valid token gets no reward at all: its score is dropped.
    """
    B, T = mask.shape
    rewards = torch.where(mask, -kl_coef * kl, 0.0)  # (B, T)
    positions = torch.arange(T, device=mask.device).expand(B, T)  # (B, T)
    last = torch.where(mask, positions, -1).amax(dim=1)  # (B,), -1 for an empty row
    at_last = positions == last[:, None]  # (B, T), all False for an empty row
    return rewards + torch.where(at_last, scores[:, None].to(rewards.dtype), 0.0)


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns `(advantages, returns)`, each `(B, T)`, not whitened.

    The value after a row's last valid token is 0. Masked positions are treated as absent from the
    sequence: they add nothing, the recursion passes over them, and they get 0 advantage and return.
    So a row's result does not depend on how much padding surrounds it. `returns = advantages + values`.
    """
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # (B,) value of the next valid token, 0 past the end
    next_advantage = rewards.new_zeros(B)  # (B,)
    advantages = []
    for t in reversed(range(T)):
        valid = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
        advantages.append(torch.where(valid, advantage, 0.0))
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    returns = torch.where(mask, advantages + values, 0.0)  # (B, T)
    return advantages, returns


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go `G_t = sum_{t' >= t} gamma^(t' - t) r_t'` over each row's valid tokens `(B, T)`.

    REINFORCE's return (OpenRLHF's `get_cumulative_returns`): GAE with V = 0 and lambda = 1. Masked positions
    are absent from the sequence, as in `compute_gae`.
    """
    B, T = rewards.shape
    future = rewards.new_zeros(B)  # (B,) return from the next valid token on
    returns = []
    for t in reversed(range(T)):
        valid = mask[:, t]  # (B,)
        g = rewards[:, t] + gamma * future
        future = torch.where(valid, g, future)
        returns.append(torch.where(valid, g, 0.0))
    return torch.stack(returns[::-1], dim=1)  # (B, T)


def _groups(scores: Tensor, valid: Tensor, num_generations: int) -> tuple[Tensor, Tensor, Tensor]:
    """(scores, valid, count) viewed as `(B / G, G)`, `(B / G, G)`, `(B / G, 1)` (count: valid samples per group)."""
    if num_generations < 1 or scores.shape[0] % num_generations:
        raise ValueError(f"a batch of {scores.shape[0]} samples is not whole groups of num_generations={num_generations}")
    s = scores.reshape(-1, num_generations)
    v = valid.reshape(-1, num_generations)
    return torch.where(v, s, 0.0), v, v.sum(dim=1, keepdim=True)


def grpo_advantages(
    scores: Tensor,
    valid: Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = GRPO_EPS,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """GRPO's outcome advantage per sample `(B,)`: `(r_i - mean(r)) / (std + eps)`, the mean over the group's valid samples.

    Shao et al. 2024 (DeepSeekMath), eq. for outcome supervision, with TRL GRPOTrainer's conventions: `eps = 1e-4`
    and an **unbiased** (Bessel-corrected, n - 1) standard deviation, whose reach is `scale_rewards` (TRL's values):
    "group", the group's; "batch", that of every valid score of the batch (PPO Lite, Liu et al. 2025; with
    `all_reduce_sum`, e.g. a sum over ranks, the global batch's); "none", no division (Dr. GRPO, Liu et al. 2025:
    std scaling biases towards easy and hard prompts). A group whose samples all score the same gets 0 everywhere;
    a group with fewer than two valid samples has no spread to compare against and gets 0; invalid samples get 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {', '.join(SCALE_REWARDS)}")
    s, v, count = _groups(scores, valid, num_generations)  # (P, G), (P, G), (P, 1)
    mean = s.sum(dim=1, keepdim=True) / count.clamp(min=1)  # (P, 1)
    centred = torch.where(v, s - mean, 0.0)  # (P, G)
    if scale_rewards == "group":
        std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # (P, 1), unbiased
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        centred = centred / (batch_std(scores, valid, all_reduce_sum) + eps)
    return torch.where(v & (count >= 2), centred, 0.0).reshape(-1)  # (B,)


def batch_std(scores: Tensor, valid: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The unbiased standard deviation of the valid `scores` `(B,)` (over every rank's with `all_reduce_sum`); 0 with
    fewer than two."""
    return masked_moments(scores, valid, all_reduce_sum)[2].sqrt()


def groups_with_signal(scores: Tensor, valid: Tensor, num_generations: int) -> Tensor:
    """Per group `(B / G,)` bool: whether its valid samples' scores differ (DAPO's dynamic sampling keeps only those).

    A group whose valid samples all score the same, or with fewer than two valid samples, gets advantage 0 from
    every group estimator: it carries no signal."""
    s, v, count = _groups(scores, valid, num_generations)  # (P, G), (P, G), (P, 1)
    highest = torch.where(v, s, -torch.inf).amax(dim=1)  # (P,)
    lowest = torch.where(v, s, torch.inf).amin(dim=1)  # (P,)
    return (count.squeeze(1) >= 2) & (highest > lowest)


def rloo_advantages(scores: Tensor, valid: Tensor, num_generations: int) -> Tensor:
    """RLOO's advantage per sample `(B,)`: `r_i - mean_{j != i} r_j` over the group's valid samples.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", eq. (RLOO with k samples): the baseline of each sample is the mean of the other k - 1.
    Equal to `k / (k - 1) * (r_i - mean(r))`. Fewer than two valid samples leave no baseline: 0.
    """
    s, v, count = _groups(scores, valid, num_generations)  # (P, G), (P, G), (P, 1)
    others = (s.sum(dim=1, keepdim=True) - s) / (count - 1).clamp(min=1)  # (P, G) mean of the other valid samples
    return torch.where(v & (count >= 2), s - others, 0.0).reshape(-1)  # (B,)
