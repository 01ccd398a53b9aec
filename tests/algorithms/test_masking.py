"""Masked reductions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_rl.algorithms.masking import masked_mean, masked_sum, masked_var

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[True, True, False, False], [True, True, True, False]])
# Valid entries: 1, 2, 5, 6, 7.


def test_masked_sum_and_mean_global():
    # sum = 1 + 2 + 5 + 6 + 7 = 21; mean = 21 / 5 = 4.2
    assert masked_sum(X, MASK).item() == pytest.approx(21.0)
    assert masked_mean(X, MASK).item() == pytest.approx(4.2)


def test_masked_sum_and_mean_along_dims():
    # rows: 1 + 2 = 3 over 2 entries, 5 + 6 + 7 = 18 over 3 entries
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 18.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 6.0]))
    # columns: (1 + 5) / 2, (2 + 6) / 2, 7 / 1, nothing valid -> 0
    torch.testing.assert_close(masked_sum(X, MASK, dim=0), torch.tensor([6.0, 8.0, 7.0, 0.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=0), torch.tensor([3.0, 4.0, 7.0, 0.0]))


def test_masked_var():
    # deviations from 4.2: -3.2, -2.2, 0.8, 1.8, 2.8; squares 10.24 + 4.84 + 0.64 + 3.24 + 7.84 = 26.8
    # unbiased 26.8 / 4 = 6.7; biased 26.8 / 5 = 5.36
    assert masked_var(X, MASK).item() == pytest.approx(6.7)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(5.36)
    # two valid entries (1, 2): mean 1.5, squares 0.25 + 0.25; unbiased 0.5 / 1, biased 0.5 / 2
    two = torch.tensor([[True, True, False, False], [False] * 4])
    assert masked_var(X, two).item() == pytest.approx(0.5)
    assert masked_var(X, two, unbiased=False).item() == pytest.approx(0.25)


def test_row_without_valid_entry_is_zero():
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    torch.testing.assert_close(masked_mean(X, mask, dim=1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(masked_sum(X, mask, dim=1), torch.tensor([3.0, 0.0]))


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros_like(MASK)
    assert masked_sum(X, empty).item() == 0.0
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    assert masked_var(X, empty, unbiased=False).item() == 0.0


def test_single_valid_entry_has_zero_variance():
    one = torch.zeros_like(MASK)
    one[1, 2] = True
    assert masked_mean(X, one).item() == 7.0
    assert masked_var(X, one).item() == 0.0


def test_non_finite_padding_does_not_leak():
    x = X.clone().requires_grad_(True)
    poisoned = torch.where(MASK, x, torch.tensor(math.nan))
    poisoned = poisoned.masked_fill(~MASK & (X > 7), math.inf)
    mean = masked_mean(poisoned, MASK)
    mean.backward()
    assert mean.item() == pytest.approx(4.2)
    assert masked_var(poisoned.detach(), MASK).item() == pytest.approx(6.7)
    # d mean / d x = 1 / 5 on the valid entries, exactly 0 on the padding
    torch.testing.assert_close(x.grad, MASK.float() / 5)
