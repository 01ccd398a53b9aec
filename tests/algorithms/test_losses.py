"""The policy loss (loss types, clip-higher, two-sided clipping, sequence-level ratios, cispo, KL and entropy in the
loss), the top-entropy mask and the clipped value loss against hand-computed values and gradients. (The same
quantities against TRL's own GRPOTrainer: test_trl_oracle.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from vlm_rl.algorithms.losses import LossNormaliser, PolicyObjective, aggregate, high_entropy_mask, policy_loss, value_loss

T_ = True
F_ = False
LOG_1_5 = math.log(1.5)
PPO = PolicyObjective(epsilon_low=0.2)  # symmetric clip 0.2, token mean (dapo), no KL, no entropy

# ---------------------------------------------------------------- policy_loss


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.6, -0.7, -0.8]])
    advantages = torch.tensor([[1.0, -2.0, 3.0, 50.0], [0.5, 1.5, -7.0, -7.0]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])
    # valid advantages 1 - 2 + 3 + 0.5 + 1.5 = 4 over 5 tokens: mean 0.8, loss -0.8
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, PPO)
    assert loss.item() == pytest.approx(-0.8)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_policy_loss_clipped_positive_advantage_has_no_gradient():
    # ratio 1.5 > 1 + 0.2 with A = 2: -A*ratio = -3, -A*clip = -2.4, max = -2.4 (clipped branch)
    old = torch.tensor([[-1.0]])
    logprobs = (old + LOG_1_5).requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, torch.tensor([[2.0]]), torch.tensor([[T_]]), PPO)
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
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 3, dtype=torch.bool), PPO)
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
    loss, stats = policy_loss(logprobs, old, advantages, mask, PPO)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats.values())
    assert torch.all(logprobs.grad[~mask] == 0)
    assert torch.all(logprobs.grad[mask] != 0)


def test_policy_loss_empty_mask_is_zero():
    logprobs = torch.randn(2, 3).requires_grad_(True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, torch.randn(2, 3), torch.randn(2, 3), empty, PPO)
    loss.backward()
    assert loss.item() == 0.0
    assert all(s.item() == 0.0 for s in stats.values())
    assert torch.equal(logprobs.grad, torch.zeros(2, 3))


# ---------------------------------------------------------------- loss types

# per-token losses [[1, 2, 3, pad], [4, pad, pad, pad]]: 4 valid tokens summing to 10, sequences of 3 and 1 tokens
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
PER_TOKEN_MASK = torch.tensor([[T_, T_, T_, F_], [T_, F_, F_, F_]])


@pytest.mark.parametrize(
    "loss_type, alone, in_a_larger_mini_batch",
    [
        ("grpo", (6 / 3 + 4 / 1) / 2, (6 / 3 + 4 / 1) / 4),  # mean over sequences of their token means
        ("bnpo", 10 / 4, 10 / 4 / 2),  # this batch's token mean / (micro-batches x ranks)
        ("dr_grpo", 10 / (2 * 5), 10 / (4 * 5)),  # token sum / (sequences x max_completion_length 5, not the width 4)
        ("dapo", 10 / 4, 10 / 8),  # token sum / the mini-batch's tokens
        ("cispo", 10 / 4, 10 / 8),
    ],
)
def test_each_loss_type_aggregates_as_defined(loss_type, alone, in_a_larger_mini_batch):
    # alone: this batch is the mini-batch; larger: one of 2 micro-batches of a mini-batch of 4 sequences, 8 tokens
    assert aggregate(PER_TOKEN, PER_TOKEN_MASK, loss_type, LossNormaliser.of(PER_TOKEN_MASK), 5).item() == pytest.approx(alone)
    larger = LossNormaliser(tokens=torch.tensor(8.0), sequences=4.0, local_batches=2)
    assert aggregate(PER_TOKEN, PER_TOKEN_MASK, loss_type, larger, 5).item() == pytest.approx(in_a_larger_mini_batch)


def ratios_and_advantages(log_ratios: list[float], advantages: list[float]):
    """(logprobs with grad, old logprobs, advantages, mask) for one row of tokens with the given log-ratios."""
    old = -torch.arange(1.0, len(log_ratios) + 1)[None]
    logprobs = (old + torch.tensor([log_ratios])).requires_grad_(True)
    return logprobs, old, torch.tensor([advantages]), torch.ones(1, len(log_ratios), dtype=torch.bool)


def test_clip_higher_clips_above_at_one_plus_epsilon_high():
    # epsilon_low 0.2, epsilon_high 0.28; ratios [1.25, 1.35, 0.75, 0.85], A [1, 1, -1, -1]
    # tok 0: 1.25 < 1.28: unclipped, -1.25, d/dlogp = -A ratio = -1.25   (symmetric 0.2 would clip it: 1.25 > 1.2)
    # tok 1: 1.35 > 1.28: clipped high, -1.28, grad 0
    # tok 2: 0.75 < 0.8, A < 0: clipped low, -min(-0.75, -0.8) = 0.8, grad 0
    # tok 3: 0.85, A < 0: unclipped, 0.85, d/dlogp = 0.85
    # loss = (-1.25 - 1.28 + 0.8 + 0.85) / 4 = -0.22; grad [-1.25, 0, 0, 0.85] / 4
    logprobs, old, advantages, mask = ratios_and_advantages([math.log(1.25), math.log(1.35), math.log(0.75), math.log(0.85)], [1, 1, -1, -1])
    loss, stats = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.2, epsilon_high=0.28))
    loss.backward()
    assert loss.item() == pytest.approx(-0.22)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.25, 0.0, 0.0, 0.85]]) / 4)
    assert (stats["clipfrac"].item(), stats["clipfrac_low"].item(), stats["clipfrac_high"].item()) == (0.5, 0.25, 0.25)
    symmetric, symmetric_stats = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.2))
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 0.85) / 4) and symmetric_stats["clipfrac_high"].item() == 0.5


def test_delta_caps_the_ratio_of_negative_advantages():
    # ratio 3, A -1, epsilon 0.2: PPO takes the unclipped -A ratio = 3 (gradient -A ratio = 3);
    # delta 2 caps it: -min(2 x -1, 1.2 x -1) = 2, and the capped ratio has no gradient
    logprobs, old, advantages, mask = ratios_and_advantages([math.log(3.0)], [-1.0])
    plain, _ = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.2))
    (plain_grad,) = torch.autograd.grad(plain, logprobs)
    capped, _ = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.2, delta=2.0))
    (capped_grad,) = torch.autograd.grad(capped, logprobs)
    assert (plain.item(), capped.item()) == (pytest.approx(3.0), pytest.approx(2.0))
    assert (plain_grad.item(), capped_grad.item()) == (pytest.approx(3.0), 0.0)


def test_sequence_level_ratio_is_the_geometric_mean_of_the_token_ratios():
    # token log-ratios [ln 2, 0] (+ a masked token holding ln 100): s = exp((ln 2 + 0) / 2) = sqrt 2 for both tokens.
    # epsilon 0.5, A = 1: sqrt 2 < 1.5, unclipped: loss = the mean of the two tokens' -s = -sqrt 2, and as
    # ds/dlogp_t = s / 2 (s is the exp of the mean log-ratio), d loss/dlogp_t = -sqrt(2) / 2 for both tokens.
    # Token level instead: ratio 2 clipped to 1.5 (grad 0), ratio 1: -1 (grad -1/2): loss -1.25.
    logprobs, old, advantages, _ = ratios_and_advantages([math.log(2.0), 0.0, math.log(100.0)], [1.0, 1.0, 1.0])
    mask = torch.tensor([[T_, T_, F_]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.5, importance_sampling_level="sequence"))
    loss.backward()
    assert loss.item() == pytest.approx(-math.sqrt(2))
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-math.sqrt(2) / 2, -math.sqrt(2) / 2, 0.0]]))
    assert stats["clipfrac"].item() == 0.0 and stats["ratio"].item() == pytest.approx(1.5)  # stats: token ratios
    token, _ = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.5))
    assert token.item() == pytest.approx(-1.25)


def test_cispo_weighs_logprobs_with_clipped_detached_ratios():
    # ratios [2, 0.5], A [1, 1], epsilon_high 1.5: weights min(r, 1.5) = [1.5, 0.5], detached; logp [-1, -2]
    # loss = -(1.5 x 1 x -1 + 0.5 x 1 x -2) / 2 = 1.25; d/dlogp = -w A / 2 = [-0.75, -0.25]
    old = torch.tensor([[-1.0 - math.log(2.0), -2.0 - math.log(0.5)]])
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, old, torch.tensor([[1.0, 1.0]]), mask, PolicyObjective(loss_type="cispo", epsilon_high=1.5))
    loss.backward()
    assert loss.item() == pytest.approx(1.25)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.75, -0.25]]))
    assert stats["clipfrac_high"].item() == 0.5 and stats["clipfrac_low"].item() == 0.0


def test_kl_in_the_loss_is_k3_weighted_by_the_ratio():
    # logp = old = -1 (ratio 1), ref -1.5, A 0, kl_coef 0.1: k3 = exp(ref - logp) - (ref - logp) - 1 = e^-0.5 - 0.5
    # d/dlogp [k3 x ratio] = (1 - e^-0.5) x 1 + k3 x 1 = 0.5 exactly: grad 0.1 x 0.5 = 0.05 (TRL's bias correction);
    # without it, 0.1 x (1 - e^-0.5)
    logprobs = torch.tensor([[-1.0]], requires_grad=True)
    old, ref, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.ones(1, 1, dtype=torch.bool)
    k3 = math.exp(-0.5) - 0.5
    for bias_correction, grad in ((True, 0.05), (False, 0.1 * (1 - math.exp(-0.5)))):
        objective = PolicyObjective(kl_coef=0.1, use_bias_correction_kl=bias_correction)
        loss, _ = policy_loss(logprobs, old, torch.zeros(1, 1), mask, objective, ref_logprobs=ref)
        (g,) = torch.autograd.grad(loss, logprobs)
        assert loss.item() == pytest.approx(0.1 * k3) and g.item() == pytest.approx(grad)


def test_entropy_bonus_and_top_entropy_tokens():
    # entropies [0.5, 1.5], coef 0.1: loss -0.1 x mean = -0.1, d/dH = -0.05 each; on the top-entropy token only
    # (entropy_mask [F, T]): -0.15, d/dH = [0, -0.1], and the policy term of token 0 is gone (A = [1, 1], ratio 1:
    # per-token -1, -1 -> only token 1's -1 / 2 tokens = -0.5); with 2 micro-batches x ranks the bonus halves.
    logprobs, old, advantages, mask = ratios_and_advantages([0.0, 0.0], [1.0, 1.0])
    entropy = torch.tensor([[0.5, 1.5]], requires_grad=True)
    objective = PolicyObjective(entropy_coef=0.1)
    loss, _ = policy_loss(logprobs, old, advantages, mask, objective, entropy=entropy)
    (g,) = torch.autograd.grad(loss, entropy)
    assert loss.item() == pytest.approx(-1.0 - 0.1) and g.tolist() == [[pytest.approx(-0.05)] * 2]
    top = torch.tensor([[F_, T_]])
    loss, _ = policy_loss(logprobs, old, advantages, mask, objective, entropy=entropy, entropy_mask=top)
    (g,) = torch.autograd.grad(loss, entropy)
    assert loss.item() == pytest.approx(-0.5 - 0.15) and g.tolist() == [[0.0, pytest.approx(-0.1)]]
    halved, _ = policy_loss(logprobs, old, advantages, mask, objective, LossNormaliser(torch.tensor(2.0), 1.0, local_batches=2), entropy=entropy)
    assert halved.item() == pytest.approx(-1.0 - 0.05)


def test_high_entropy_mask_keeps_the_top_quantile_of_valid_tokens():
    entropy = torch.tensor([[0.1, 0.5, 0.9, 5.0]])  # the 5.0 is padding: it neither counts nor is kept
    mask = torch.tensor([[T_, T_, T_, F_]])
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == [[F_, T_, T_, F_]]  # median 0.5 of [0.1, 0.5, 0.9]
    assert high_entropy_mask(entropy, mask, 0.0).tolist() == [[F_, F_, T_, F_]]  # only the highest
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == [[T_, T_, T_, F_]]
    # the quantile of every rank's tokens: another rank's high entropies raise the threshold above all of ours
    assert high_entropy_mask(entropy, mask, 0.5, gather=lambda t: torch.cat([t, torch.tensor([2.0, 3.0, 4.0])])).tolist() == [[F_] * 4]
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


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


def test_value_loss_aggregates_by_the_loss_type():
    # squared errors [[1, 1, 1], [4, pad, pad]] (no clipping: old = v): grpo 0.5 x (1 + 4) / 2; dapo 0.5 x 7 / 4
    values = torch.zeros(2, 3)
    returns = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    assert value_loss(values, values, returns, mask, 0.2, "grpo")[0].item() == pytest.approx(1.25)
    assert value_loss(values, values, returns, mask, 0.2, "dapo")[0].item() == pytest.approx(7 / 8)
