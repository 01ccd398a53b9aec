"""Clipped policy and value losses against hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_rl.algorithms.losses import policy_loss, value_loss

T_ = True
F_ = False
LOG_1_5 = math.log(1.5)

# ---------------------------------------------------------------- policy_loss


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.6, -0.7, -0.8]])
    advantages = torch.tensor([[1.0, -2.0, 3.0, 50.0], [0.5, 1.5, -7.0, -7.0]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])
    # valid advantages 1 - 2 + 3 + 0.5 + 1.5 = 4 over 5 tokens: mean 0.8, loss -0.8
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-0.8)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_policy_loss_clipped_positive_advantage_has_no_gradient():
    # ratio 1.5 > 1 + 0.2 with A = 2: -A*ratio = -3, -A*clip = -2.4, max = -2.4 (clipped branch)
    old = torch.tensor([[-1.0]])
    logprobs = (old + LOG_1_5).requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, torch.tensor([[2.0]]), torch.tensor([[T_]]), cliprange=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-2.4)
    assert stats["clipfrac"].item() == 1.0
    assert stats["ratio"].item() == pytest.approx(1.5)
    assert logprobs.grad.item() == 0.0


def test_policy_loss_mixed_hand_computed():
    # c = 0.2, log-ratio [ln 1.5, ln 1.5, 0], A = [2, -1, 1]
    # tok 0: ratio 1.5, A  2: max(-3.0, -2.4) = -2.4 clipped   -> grad 0
    # tok 1: ratio 1.5, A -1: max( 1.5,  1.2) =  1.5 unclipped -> d/dlogp = -A*ratio = 1.5
    # tok 2: ratio 1.0, A  1: max(-1.0, -1.0) = -1.0           -> d/dlogp = -A*ratio = -1
    # loss = (-2.4 + 1.5 - 1.0) / 3 = -1.9 / 3; grad = [0, 1.5, -1] / 3
    # clipfrac = 1/3; approxkl = 0.5 * 2 * ln(1.5)^2 / 3 = ln(1.5)^2 / 3; ratio = (1.5 + 1.5 + 1) / 3 = 4/3
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    logprobs = (old + torch.tensor([[LOG_1_5, LOG_1_5, 0.0]])).requires_grad_(True)
    advantages = torch.tensor([[2.0, -1.0, 1.0]])
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 3, dtype=torch.bool), cliprange=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.9 / 3)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.5, -1.0 / 3]]))
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approxkl"].item() == pytest.approx(LOG_1_5**2 / 3)
    assert stats["ratio"].item() == pytest.approx(4 / 3)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())


def test_policy_loss_no_gradient_to_masked_positions():
    mask = torch.tensor([[T_, T_, F_, F_], [T_, F_, F_, F_], [F_, F_, F_, F_]])
    logprobs = torch.randn(3, 4).requires_grad_(True)
    # garbage in the padding must change neither the loss nor the gradient
    old = torch.where(mask, logprobs.detach() - 0.1, torch.tensor(math.nan))
    advantages = torch.where(mask, torch.randn(3, 4), torch.tensor(math.inf))
    loss, stats = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats.values())
    assert torch.all(logprobs.grad[~mask] == 0)
    assert torch.all(logprobs.grad[mask] != 0)


def test_policy_loss_empty_mask_is_zero():
    logprobs = torch.randn(2, 3).requires_grad_(True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, torch.randn(2, 3), torch.randn(2, 3), empty, cliprange=0.2)
    loss.backward()
    assert loss.item() == 0.0
    assert all(s.item() == 0.0 for s in stats.values())
    assert torch.equal(logprobs.grad, torch.zeros(2, 3))


# ---------------------------------------------------------------- value_loss


def test_value_loss_clipped_and_unclipped_hand_computed():
    # c = 0.25 (all numbers below are exact in binary)
    # tok 0: v 1.0, old 0.875, R 2: inside the range, v_clip = 1.0; (1-2)^2 = 1 both -> 1, not clipped
    # tok 1: v 1.5, old 1.0,   R 0: v_clip = 1.25; (1.5)^2 = 2.25 > (1.25)^2 = 1.5625 -> 2.25, not clipped
    # tok 2: v 1.5, old 1.0,   R 2: v_clip = 1.25; (0.5)^2 = 0.25 < (0.75)^2 = 0.5625 -> 0.5625, clipped
    # loss = 0.5 * (1 + 2.25 + 0.5625) / 3 = 1.90625 / 3; clipfrac = 1/3
    # d/dv = (v - R) / 3 on unclipped tokens, 0 on the clipped one: [-1/3, 1.5/3, 0]
    values = torch.tensor([[1.0, 1.5, 1.5]], requires_grad=True)
    old = torch.tensor([[0.875, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3, dtype=torch.bool), cliprange_value=0.25)
    loss.backward()
    assert loss.item() == pytest.approx(1.90625 / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert not stats["clipfrac"].requires_grad
    torch.testing.assert_close(values.grad, torch.tensor([[-1.0 / 3, 0.5, 0.0]]))


def test_value_loss_fully_clipped_and_fully_unclipped():
    mask = torch.ones(1, 1, dtype=torch.bool)
    # v 1.5, old 1.0, R 2, c 0.25: clipped wins, 0.5 * 0.5625 = 0.28125
    loss, stats = value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), mask, 0.25)
    assert loss.item() == pytest.approx(0.28125)
    assert stats["clipfrac"].item() == 1.0
    # v 1.0, old 1.0, R 2: no clipping, 0.5 * 1 = 0.5
    loss, stats = value_loss(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), mask, 0.25)
    assert loss.item() == pytest.approx(0.5)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_no_gradient_to_masked_positions():
    mask = torch.tensor([[T_, T_, T_, F_], [T_, F_, F_, F_], [F_, F_, F_, F_]])
    values = torch.randn(3, 4).requires_grad_(True)
    old = torch.where(mask, torch.randn(3, 4), torch.tensor(math.nan))
    returns = torch.where(mask, torch.randn(3, 4) + 5, torch.tensor(math.inf))
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats["clipfrac"])
    assert torch.all(values.grad[~mask] == 0)


def test_value_loss_empty_mask_is_zero():
    values = torch.randn(2, 3).requires_grad_(True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = value_loss(values, torch.randn(2, 3), torch.randn(2, 3), empty, cliprange_value=0.2)
    loss.backward()
    assert loss.item() == 0.0 and stats["clipfrac"].item() == 0.0
    assert torch.equal(values.grad, torch.zeros(2, 3))
