"""PPO's clipped policy and value losses.

Tensors are `(B, T)` over response tokens; `mask` is a bool `(B, T)` marking the real ones. Each loss
is a token mean: the sum over the valid tokens divided by `num_items`, which defaults to this batch's
valid-token count (0 when there is none). With gradient accumulation or several ranks, pass the whole
mini-batch's valid-token count as `num_items`, so that the gradient does not depend on how the
mini-batch is split (TRL's and transformers' `num_items_in_batch`). Losses are differentiable with
respect to the new logprobs or values; masked positions get exactly zero gradient, even when they hold
NaN. Stats are detached scalar tensors, means over this batch's valid tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlm_rl.algorithms.masking import masked_mean, masked_sum


def token_mean(x: Tensor, mask: Tensor, num_items: Tensor | float | None) -> Tensor:
    """Sum of `x` over the valid tokens / `num_items` (default: the number of valid tokens, at least 1)."""
    if num_items is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask) / num_items


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    num_items: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate loss, with stats `clipfrac`, `approxkl` and `ratio`.

    loss = token mean of max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)), ratio = exp(logp - old).
    `clipfrac` is the fraction of valid tokens where the clipped branch is taken,
    `approxkl` = 0.5 * masked mean of (logp - old)^2, `ratio` the masked mean ratio.
    """
    # Padding is zeroed before any arithmetic, so a NaN or inf there cannot reach the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, T)
    advantages = torch.where(mask, advantages, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, num_items)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    num_items: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, with stat `clipfrac`.

    loss = 0.5 * token mean of max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clamp(v - old, -c, c).
    `clipfrac` is the fraction of valid tokens where the clipped loss is the larger.
    """
    # Padding is zeroed before any arithmetic, so a NaN or inf there cannot reach the gradient.
    values = torch.where(mask, values, 0.0)  # (B, T)
    old_values = torch.where(mask, old_values, 0.0)  # (B, T)
    returns = torch.where(mask, returns, 0.0)  # (B, T)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * token_mean(torch.maximum(unclipped, clipped), mask, num_items)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}
    return loss, stats
