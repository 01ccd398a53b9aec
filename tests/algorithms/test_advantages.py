"""KL penalty, whitening, reward shaping, GAE and the critic-free estimators against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_rl.algorithms.advantages import (
    compute_gae,
    discounted_returns,
    grpo_advantages,
    groups_with_signal,
    kl_penalty,
    rloo_advantages,
    shape_rewards,
    whiten,
)
from vlm_rl.algorithms.masking import masked_mean, masked_var

T_ = True
F_ = False

# ---------------------------------------------------------------- kl_penalty

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])
# d = logp - ref = [0.5, -1.0, 0.0]; r = ref - logp = -d = [-0.5, 1.0, 0.0]


def test_kl_k1():
    torch.testing.assert_close(kl_penalty(LOGP, REF), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))


def test_kl_k2():
    # 0.5 * d^2 = [0.5 * 0.25, 0.5 * 1.0, 0] = [0.125, 0.5, 0]
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))


def test_kl_k3():
    # exp(r) - r - 1: exp(-0.5) + 0.5 - 1 = 0.60653066 - 0.5 = 0.10653066
    #                 exp(1.0) - 1.0 - 1 = 2.71828183 - 2 = 0.71828183
    #                 exp(0) - 0 - 1 = 0
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k3"), torch.tensor([[0.10653066, 0.71828183, 0.0]]))


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")


# ---------------------------------------------------------------- whiten

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[T_, T_, F_, F_], [T_, T_, T_, F_]])
# Valid entries 1, 2, 5, 6, 7: mean 4.2, deviations [-3.2, -2.2, 0.8, 1.8, 2.8], unbiased var 26.8 / 4 = 6.7
STD = math.sqrt(6.7 + 1e-8)


def test_whiten_hand_values():
    expected = torch.tensor([[-3.2, -2.2, 0.0, 0.0], [0.8, 1.8, 2.8, 0.0]]) / STD
    torch.testing.assert_close(whiten(X, MASK), expected)


def test_whiten_moments_and_zero_padding():
    x = torch.randn(3, 6) * 5 + 2
    mask = torch.tensor([[T_] * 6, [T_] * 3 + [F_] * 3, [F_] * 6])
    w = whiten(x, mask)
    assert masked_mean(w, mask).abs().item() < 1e-6
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[~mask] == 0)


def test_whiten_keep_mean():
    # shift_mean=False adds the mean 4.2 back after scaling
    expected = torch.tensor([[-3.2, -2.2, 0.0, 0.0], [0.8, 1.8, 2.8, 0.0]]) / STD
    expected = torch.where(MASK, expected + 4.2, 0.0)
    torch.testing.assert_close(whiten(X, MASK, shift_mean=False), expected)


def test_whiten_fewer_than_two_valid_entries():
    one = torch.tensor([[F_, F_, T_, F_], [F_, F_, F_, F_]])
    # one valid entry (3.0): only centred, 3.0 - 3.0 = 0; with the mean kept, 3.0 itself
    assert torch.equal(whiten(X, one), torch.zeros_like(X))
    assert torch.equal(whiten(X, one, shift_mean=False), torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0] * 4]))
    empty = torch.zeros_like(MASK)
    assert torch.equal(whiten(X, empty), torch.zeros_like(X))
    assert torch.equal(whiten(X, empty, shift_mean=False), torch.zeros_like(X))


def test_whiten_of_equal_values_is_zero_not_nan():
    # variance 0: the 1e-8 in the inverse standard deviation keeps (x - mean) * inv_std at 0 instead of 0 * inf
    w = whiten(torch.full((2, 3), 0.7), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(w, torch.zeros(2, 3))


# ---------------------------------------------------------------- shape_rewards


def test_shape_rewards_score_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 1.0, 9.0]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])
    # kl_coef 0.1: row 0 = [-0.01, -0.02, -0.03 + 1.0, 0] ; row 1 = [-0.05, +0.05 + 2.0, 0, 0]
    expected = torch.tensor([[-0.01, -0.02, 0.97, 0.0], [-0.05, 2.05, 0.0, 0.0]])
    torch.testing.assert_close(shape_rewards(scores, kl, mask, kl_coef=0.1), expected)


def test_shape_rewards_full_short_and_empty_rows():
    scores = torch.tensor([3.0, 4.0, 5.0])
    kl = torch.full((3, 4), 0.5)
    mask = torch.tensor([[T_, T_, T_, T_], [T_, F_, F_, F_], [F_, F_, F_, F_]])
    # coef 0.2: every valid token gets -0.1
    # row 0: full row, score on index 3: -0.1 + 3 = 2.9
    # row 1: one token, which is also the last: -0.1 + 4 = 3.9
    # row 2: no valid token -> all zeros, score 5 dropped
    expected = torch.tensor([[-0.1, -0.1, -0.1, 2.9], [3.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(shape_rewards(scores, kl, mask, kl_coef=0.2), expected)


def test_shape_rewards_last_true_with_holes():
    # the score goes on the last True (index 2), not after the first False
    mask = torch.tensor([[T_, F_, T_, F_]])
    rewards = shape_rewards(torch.tensor([1.0]), torch.zeros(1, 4), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


# ---------------------------------------------------------------- compute_gae


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    nan = math.nan  # padding content must not matter
    rewards = torch.tensor([[1.0, 2.0, 3.0, nan], [4.0, 5.0, nan, nan], [nan] * 4])
    values = torch.tensor([[0.5, 1.0, 1.5, nan], [2.0, 3.0, 7.0, 7.0], [1.0] * 4])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_], [F_] * 4])
    # row 0: reward-to-go [6, 5, 3] - values [0.5, 1, 1.5] = [5.5, 4, 1.5]; returns = reward-to-go
    # row 1: reward-to-go [9, 5] - values [2, 3] = [7, 2]
    # row 2: nothing valid -> zeros
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(
        advantages, torch.tensor([[5.5, 4.0, 1.5, 0.0], [7.0, 2.0, 0.0, 0.0], [0.0] * 4])
    )
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0, 0.0], [9.0, 5.0, 0.0, 0.0], [0.0] * 4]))


def test_gae_hand_computed_discounted():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # gamma 0.9, lam 0.95, gamma*lam = 0.855, value after the last token = 0
    # delta_2 = 2 + 0.9*0   - 0.8 = 1.2
    # delta_1 = 0 + 0.9*0.8 - 0.4 = 0.32
    # delta_0 = 1 + 0.9*0.4 - 0.5 = 0.86
    # A_2 = 1.2
    # A_1 = 0.32 + 0.855*1.2   = 0.32 + 1.026   = 1.346
    # A_0 = 0.86 + 0.855*1.346 = 0.86 + 1.15083 = 2.01083
    # returns = A + V = [2.51083, 1.746, 2.0]
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[2.01083, 1.346, 1.2]]))
    torch.testing.assert_close(returns, torch.tensor([[2.51083, 1.746, 2.0]]))


def test_gae_empty_mask_is_all_zero():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    advantages, returns = compute_gae(torch.randn(2, 3), torch.randn(2, 3), empty, gamma=1.0, lam=0.95)
    assert torch.equal(advantages, torch.zeros(2, 3))
    assert torch.equal(returns, torch.zeros(2, 3))


def test_gae_padding_invariance():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(1, 5, generator=g), torch.randn(1, 5, generator=g)
    alone_adv, alone_ret = compute_gae(rewards, values, torch.ones(1, 5, dtype=torch.bool), 0.9, 0.95)

    # the same row, padded with 3 garbage columns, next to a longer row
    padded_rewards = torch.cat([rewards, torch.full((1, 3), 1e3)], dim=1)
    padded_values = torch.cat([values, torch.full((1, 3), -1e3)], dim=1)
    batch_rewards = torch.cat([padded_rewards, torch.randn(1, 8, generator=g)])
    batch_values = torch.cat([padded_values, torch.randn(1, 8, generator=g)])
    mask = torch.tensor([[T_] * 5 + [F_] * 3, [T_] * 8])
    adv, ret = compute_gae(batch_rewards, batch_values, mask, 0.9, 0.95)

    # exact: GAE is elementwise per row (no reduction, no GEMM), so another batch cannot change the rounding
    assert torch.equal(adv[0, :5], alone_adv[0])
    assert torch.equal(ret[0, :5], alone_ret[0])
    assert torch.equal(adv[0, 5:], torch.zeros(3))
    assert torch.equal(ret[0, 5:], torch.zeros(3))


def test_gae_passes_over_observation_positions_of_a_multi_turn_trajectory():
    """A trajectory's observation tokens (tool output between two model turns) are not steps: GAE over the model's
    tokens with the observations between them equals the hand-computed GAE of the model's tokens alone (the values of
    test_gae_hand_computed_discounted), whatever the observations' rewards and values hold; they get 0."""
    junk = 1e3
    # model turn 1: token 0; observation: tokens 1-3; model turn 2: tokens 4-5
    rewards = torch.tensor([[1.0, junk, junk, junk, 0.0, 2.0]])
    values = torch.tensor([[0.5, -junk, junk, -junk, 0.4, 0.8]])
    mask = torch.tensor([[T_, F_, F_, F_, T_, T_]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[2.01083, 0.0, 0.0, 0.0, 1.346, 1.2]]))
    torch.testing.assert_close(returns, torch.tensor([[2.51083, 0.0, 0.0, 0.0, 1.746, 2.0]]))
    # a per-turn reward of 0.5 on turn 1's last token (index 0) adds to its delta only: A_0 = 2.01083 + 0.5
    turn = torch.tensor([[0.5, 0, 0, 0, 0, 0]])
    advantages, _ = compute_gae(shape_rewards(torch.tensor([0.0]), torch.zeros(1, 6), mask, 0.0) + rewards * mask + turn, values, mask, 0.9, 0.95)
    torch.testing.assert_close(advantages, torch.tensor([[2.51083, 0.0, 0.0, 0.0, 1.346, 1.2]]))

# ---------------------------------------------------------------- discounted_returns (REINFORCE++)


def test_discounted_returns_hand_computed():
    nan = math.nan  # padding content must not matter
    rewards = torch.tensor([[1.0, 2.0, 3.0, nan], [1.0, 9.0, 2.0, nan], [nan] * 4])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, F_, T_, F_], [F_] * 4])
    # gamma 0.5, row 0: G_2 = 3, G_1 = 2 + 0.5*3 = 3.5, G_0 = 1 + 0.5*3.5 = 2.75
    # row 1, a hole at index 1 (absent from the sequence): G_2 = 2, G_0 = 1 + 0.5*2 = 2
    # row 2: nothing valid -> zeros
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0], [2.0, 0.0, 2.0, 0.0], [0.0] * 4])
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=0.5), expected)
    # gamma 1: the plain reward-to-go [6, 5, 3]
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=1.0)[0], torch.tensor([6.0, 5.0, 3.0, 0.0]))


# ---------------------------------------------------------------- GRPO and RLOO group advantages

# Four groups of G = 3, consecutive: a spread group, a group where every sample scores the same, a group with
# one unscored sample (its score, 99, must not count), a group with a single scored sample.
GROUP_SCORES = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 5.0, 99.0, 1.0, 99.0, 7.0, 99.0])
GROUP_VALID = torch.tensor([T_, T_, T_, T_, T_, T_, T_, F_, T_, F_, T_, F_])


def test_grpo_hand_computed_unbiased_std():
    # group 0: mean 7/3, deviations [-4/3, -1/3, 5/3], squares 42/9, unbiased var (42/9)/2 = 7/3, std 1.5275252
    #          -> deviations / (1.5275252 + 1e-4) = [-0.8728177, -0.2182044, 1.0910222]
    # group 1: all 3 -> deviations 0 -> 0 (std 0: 0 / 1e-4 = 0)
    # group 2: scored 5 and 1: mean 3, deviations [2, -2], unbiased var 8 / 1, std 2.8284271
    #          -> [2 / 2.8285271, 0 (unscored), -2 / 2.8285271] = [0.7070818, 0, -0.7070818]
    # group 3: one scored sample -> 0
    std0, std2 = math.sqrt(7 / 3), math.sqrt(8.0)
    expected = torch.tensor([
        -4 / 3 / (std0 + 1e-4), -1 / 3 / (std0 + 1e-4), 5 / 3 / (std0 + 1e-4), 0.0, 0.0, 0.0,
        2 / (std2 + 1e-4), 0.0, -2 / (std2 + 1e-4), 0.0, 0.0, 0.0,
    ])
    torch.testing.assert_close(expected[:3], torch.tensor([-0.8728177, -0.2182044, 1.0910222]))
    torch.testing.assert_close(grpo_advantages(GROUP_SCORES, GROUP_VALID, 3), expected)


def test_grpo_without_std_scaling_only_centres():
    # scale_rewards="none" (Dr. GRPO): r - group mean; group 0 [-4/3, -1/3, 5/3], group 2 [2, 0, -2]
    expected = torch.tensor([-4 / 3, -1 / 3, 5 / 3, 0.0, 0.0, 0.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(GROUP_SCORES, GROUP_VALID, 3, scale_rewards="none"), expected)


def test_grpo_batch_scaling_divides_by_the_std_of_every_valid_score():
    # scale_rewards="batch" (TRL, PPO Lite): the group-centred scores / (unbiased std of all 9 valid scores + 1e-4).
    # valid scores 1, 2, 4, 3, 3, 3, 5, 1, 7: mean 29/9; squared deviations sum to 266/9; / (9 - 1)
    valid = [1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 5.0, 1.0, 7.0]
    mean = sum(valid) / 9
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / 8)
    assert std == pytest.approx(math.sqrt(266 / 72))
    centred = torch.tensor([-4 / 3, -1 / 3, 5 / 3, 0.0, 0.0, 0.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(GROUP_SCORES, GROUP_VALID, 3, scale_rewards="batch"), centred / (std + 1e-4))
    # (over ranks, the count, sum and squared deviations are all-reduced by masked_moments, which whiten shares:
    # test_whiten_over_two_ranks_equals_whitening_the_concatenated_batch runs it on 2 gloo ranks)


def test_groups_with_signal_are_those_whose_valid_scores_differ():
    # spread; all equal; 5 vs 1 (the unscored 99 does not count); a single scored sample
    assert groups_with_signal(GROUP_SCORES, GROUP_VALID, 3).tolist() == [True, False, True, False]
    # equal valid scores with an unscored sample that differs: no signal
    assert groups_with_signal(torch.tensor([2.0, 9.0, 2.0]), torch.tensor([T_, F_, T_]), 3).tolist() == [False]


def test_rloo_hand_computed():
    # group 0: baselines (2+4)/2 = 3, (1+4)/2 = 2.5, (1+2)/2 = 1.5 -> [1-3, 2-2.5, 4-1.5] = [-2, -0.5, 2.5]
    # group 1: all equal -> 0; group 2: scored 5 and 1, each the other's baseline -> [4, 0, -4]; group 3: -> 0
    expected = torch.tensor([-2.0, -0.5, 2.5, 0.0, 0.0, 0.0, 4.0, 0.0, -4.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rloo_advantages(GROUP_SCORES, GROUP_VALID, 3), expected)


def test_group_statistics_stay_inside_each_group():
    # G = 2 over the same six first scores: groups [1, 2], [4, 3], [3, 3]
    scores, valid = GROUP_SCORES[:6], GROUP_VALID[:6]
    torch.testing.assert_close(rloo_advantages(scores, valid, 2), torch.tensor([-1.0, 1.0, 1.0, -1.0, 0.0, 0.0]))
    # unbiased std of two values a, b is |a - b| / sqrt(2): [1, 2] -> +-0.5 / (0.7071068 + 1e-4)
    half = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(grpo_advantages(scores, valid, 2), torch.tensor([-half, half, half, -half, 0.0, 0.0]))


def test_groups_must_be_whole():
    with pytest.raises(ValueError, match="num_generations=4"):
        grpo_advantages(GROUP_SCORES[:6], GROUP_VALID[:6], 4)
    with pytest.raises(ValueError, match="num_generations=4"):
        rloo_advantages(GROUP_SCORES[:6], GROUP_VALID[:6], 4)


# ---------------------------------------------------------------- whiten over ranks


def _whiten_on_rank(rank: int, port: int, x: torch.Tensor, mask: torch.Tensor, out: dict) -> None:
    """One of two gloo ranks: whitens its half of the batch with statistics summed over both."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def sum_over_ranks(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    rows = slice(0, 2) if rank == 0 else slice(2, 5)  # uneven shards, on purpose
    out[rank] = [whiten(x[rows], mask[rows], shift_mean=s, all_reduce_sum=sum_over_ranks) for s in (True, False)]
    dist.destroy_process_group()


def test_whiten_over_two_ranks_equals_whitening_the_concatenated_batch():
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x = torch.randn(5, 6) * 3 + 1  # (B, T)
    mask = torch.rand(5, 6) > 0.3
    mask[3] = False  # a row with no valid token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_whiten_on_rank, args=(port, x, mask, out), nprocs=2)
        shards = dict(out)
    for i, shift_mean in enumerate((True, False)):
        together = torch.cat([shards[0][i], shards[1][i]])
        torch.testing.assert_close(together, whiten(x, mask, shift_mean=shift_mean))
        per_rank = torch.cat([whiten(x[:2], mask[:2], shift_mean), whiten(x[2:], mask[2:], shift_mean)])
        assert not torch.allclose(together, per_rank, atol=1e-3)  # what per-rank statistics would give
