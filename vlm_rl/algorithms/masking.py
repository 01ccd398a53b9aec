"""Reductions over the valid entries of a tensor, selected by a boolean mask.

Masked-out entries are selected away with `torch.where`, never multiplied by zero, so a NaN or inf
sitting in a padded position cannot leak into a result or into a gradient. An empty selection
reduces to 0, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over the entries where `mask` is True, over all entries or along `dim`."""
    selected = torch.where(mask, x, 0.0)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the entries where `mask` is True, over all entries or along `dim`; 0 where none is valid."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all entries where `mask` is True (a scalar).

    Unbiased (Bessel-corrected) by default. With no valid entry, and with a single valid entry when
    unbiased (where the sample variance is undefined), the variance is 0.
    """
    count = mask.sum()
    centred = x - masked_mean(x, mask)
    squares = masked_sum(centred**2, mask)
    dof = (count - 1) if unbiased else count
    return squares / dof.clamp(min=1)
