"""TRL 1.16's GRPOTrainer as the oracle of vlm-rl's policy loss: the same tensors (logprobs, old and reference
logprobs, advantages, masks, entropies) go through TRL's own `GRPOTrainer._compute_loss` (on a stub carrying the
attributes it reads, its model forward replaced by the given logprobs and entropies) and through
`vlm_rl.algorithms.losses.policy_loss`; losses and gradients agree to 1e-6 for every loss type, importance-sampling
level, clip setting, KL placement and entropy option.

Where vlm-rl's definition differs on purpose, the test says so and asserts the difference: `dapo`'s normaliser is the
mini-batch's own token count, where TRL divides a generation batch of several optimiser steps by its average
(`test_dapo_normalises_by_the_mini_batch_not_the_generation_batch_average`); the clip fractions of a sequence-level
ratio count tokens, TRL's count sequences (only token-level fractions are compared).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from vlm_rl.algorithms.losses import LossNormaliser, PolicyObjective, high_entropy_mask, policy_loss

MAX_COMPLETION_LENGTH = 7


class OneProcess:
    """The accelerator attributes `_compute_loss` reads, for one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def trl_compute_loss(logprobs, entropy, inputs: dict, objective: PolicyObjective, top_entropy_quantile: float, accumulation: int = 1,
                     steps_per_generation: int | None = None):
    """TRL's `GRPOTrainer._compute_loss` for one micro-batch of `accumulation` accumulated ones, of a rollout of
    `steps_per_generation` optimiser steps (default: one), its own code on a stub: (loss, metrics)."""
    steps = accumulation if steps_per_generation is None else steps_per_generation
    stub = SimpleNamespace(
        args=SimpleNamespace(delta=objective.delta, use_bias_correction_kl=objective.use_bias_correction_kl, steps_per_generation=steps),
        accelerator=OneProcess(),
        model=SimpleNamespace(training=True),
        aux_loss_enabled=False,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None,
        importance_sampling_level=objective.importance_sampling_level,
        beta=objective.kl_coef,
        loss_type=objective.loss_type,
        epsilon_low=objective.epsilon_low,
        epsilon_high=objective.upper,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=accumulation,
        max_completion_length=MAX_COMPLETION_LENGTH,
        _entropy_bonus_enabled=objective.entropy_coef != 0,
        entropy_coef=objective.entropy_coef,
        use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list)},
    )
    stub._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logprobs, entropy, None)
    stub.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, stub)
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


def batch(seed: int, rows: int = 3, width: int = 6, per_token_advantages: bool = False):
    """Random logprobs (a leaf), old and reference logprobs ~0.3 nats away (so that clipping happens), advantages,
    entropies (a leaf) and a mask of responses of different lengths (one row one token long)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=g) * 3
    logprobs = (old + 0.3 * torch.randn(rows, width, generator=g)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(rows, width, generator=g)
    shape = (rows, width) if per_token_advantages else (rows,)
    advantages = torch.randn(shape, generator=g)
    entropy = (torch.rand(rows, width, generator=g) * 2).requires_grad_(True)
    lengths = torch.tensor([width, 1] + [width - 2] * (rows - 2))
    mask = torch.arange(width)[None] < lengths[:, None]
    return logprobs, old, ref, advantages, entropy, mask


def trl_inputs(old, ref, advantages, mask, num_items=None) -> dict:
    rows, width = mask.shape
    return {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum() if num_items is None else num_items,
    }


def ours(logprobs, old, ref, advantages, mask, entropy, objective, top_entropy_quantile, normaliser=None):
    entropy_mask = high_entropy_mask(entropy, mask, top_entropy_quantile) if top_entropy_quantile < 1 else None
    return policy_loss(logprobs, old, advantages, mask, objective, normaliser, ref_logprobs=ref, entropy=entropy, entropy_mask=entropy_mask)


CLIPS = {"symmetric": {}, "clip_higher": {"epsilon_high": 0.28}, "two_sided": {"delta": 1.3}}
EXTRAS = {
    "plain": ({}, 1.0),
    "kl": ({"kl_coef": 0.04}, 1.0),
    "kl_without_bias_correction": ({"kl_coef": 0.04, "use_bias_correction_kl": False}, 1.0),
    "entropy_bonus": ({"entropy_coef": 0.01}, 1.0),
    "top_entropy": ({}, 0.4),
    "everything": ({"kl_coef": 0.04, "entropy_coef": 0.01}, 0.4),
}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_loss_and_gradients_equal_trls(loss_type, level, clip, extra):
    settings, top = EXTRAS[extra]
    clip_settings = CLIPS[clip]
    if loss_type == "cispo":  # cispo: epsilon_high is the largest weight (TRL's meaning), and there is no delta
        clip_settings = {"epsilon_high": 1.2 if clip == "symmetric" else 1.35}
    objective = PolicyObjective(
        loss_type=loss_type, epsilon_low=0.2, importance_sampling_level=level, max_completion_length=MAX_COMPLETION_LENGTH,
        **clip_settings, **settings,
    )  # fmt: skip
    logprobs, old, ref, advantages, entropy, mask = batch(seed=zlib.crc32(f"{loss_type}-{level}-{clip}-{extra}".encode()) % 1000)
    expected, metrics = trl_compute_loss(logprobs, entropy, trl_inputs(old, ref, advantages, mask), objective, top)
    expected_grads = torch.autograd.grad(expected, [logprobs, entropy], allow_unused=True)
    loss, stats = ours(logprobs, old, ref, advantages, mask, entropy, objective, top)
    grads = torch.autograd.grad(loss, [logprobs, entropy], allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 1e-3 for g in grads)  # a real gradient
    if level == "sequence":  # a sequence-level ratio's clip fractions count tokens here, sequences in TRL
        return
    if loss_type == "cispo":
        assert stats["clipfrac_high"].item() == pytest.approx(metrics["cispo_clip_ratio"][0], abs=1e-6)
    else:
        assert stats["clipfrac_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
        assert stats["clipfrac_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)


def test_the_cases_clip_on_both_sides():
    # The random batches above must exercise clipping, or the clip settings would be untested.
    logprobs, old, ref, advantages, entropy, mask = batch(seed=1, rows=8)
    _, stats = policy_loss(logprobs, old, advantages, mask, PolicyObjective(epsilon_low=0.2))
    assert stats["clipfrac_low"] > 0.05 and stats["clipfrac_high"] > 0.05


def test_per_token_advantages_equal_trls():
    # GAE and the critic-free estimators with the KL in the reward give an advantage per token (B, T).
    objective = PolicyObjective(loss_type="grpo", epsilon_high=0.28, kl_coef=0.04)
    logprobs, old, ref, advantages, entropy, mask = batch(seed=3, per_token_advantages=True)
    expected, _ = trl_compute_loss(logprobs, entropy, trl_inputs(old, ref, advantages, mask), objective, 1.0)
    loss, _ = ours(logprobs, old, ref, advantages, mask, entropy, objective, 1.0)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(expected, logprobs)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_two_accumulated_micro_batches_equal_trls(loss_type):
    # One optimiser step of 2 accumulated micro-batches: TRL divides each micro-batch's loss by the accumulation steps
    # (grpo, bnpo, dr_grpo) or by the step's tokens (dapo, cispo); vlm-rl's LossNormaliser carries the mini-batch's
    # counts. The summed losses and gradients agree.
    objective = PolicyObjective(loss_type=loss_type, epsilon_high=1.3 if loss_type == "cispo" else 0.28, entropy_coef=0.01,
                                max_completion_length=MAX_COMPLETION_LENGTH)
    micro = [batch(seed=s) for s in (10, 11)]
    tokens = sum(m[-1].sum() for m in micro)
    normaliser = LossNormaliser(tokens=tokens, sequences=6.0, local_batches=2)
    for logprobs, old, ref, advantages, entropy, mask in micro:
        expected, _ = trl_compute_loss(logprobs, entropy, trl_inputs(old, ref, advantages, mask, num_items=tokens), objective, 1.0, accumulation=2)
        loss, _ = ours(logprobs, old, ref, advantages, mask, entropy, objective, 1.0, normaliser)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
        for got, want in zip(torch.autograd.grad(loss, [logprobs, entropy]), torch.autograd.grad(expected, [logprobs, entropy])):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dapo_normalises_by_the_mini_batch_not_the_generation_batch_average():
    # On purpose: with 2 optimiser steps per rollout (TRL steps_per_generation 2, here num_mini_batches 2), TRL divides
    # each step's token sum by half the rollout's tokens; vlm-rl by the step's own mini-batch's tokens, so that a
    # step's gradient is the token mean of that step's data. The losses differ by exactly that ratio.
    objective = PolicyObjective(loss_type="dapo")
    first, second = batch(seed=20), batch(seed=21, rows=4)
    rollout_tokens = first[-1].sum() + second[-1].sum()
    logprobs, old, ref, advantages, entropy, mask = first
    assert mask.sum() != rollout_tokens / 2  # the two mini-batches hold different numbers of tokens
    trl, _ = trl_compute_loss(logprobs, entropy, trl_inputs(old, ref, advantages, mask, num_items=rollout_tokens), objective, 1.0,
                              accumulation=1, steps_per_generation=2)
    loss, _ = ours(logprobs, old, ref, advantages, mask, entropy, objective, 1.0, LossNormaliser(mask.sum(), 3.0))
    # both are the step's token sum: TRL's over rollout_tokens / 2, ours over the step's own tokens
    torch.testing.assert_close(loss * mask.sum(), trl * rollout_tokens / 2, rtol=0, atol=1e-5)
    assert not torch.allclose(loss, trl, atol=1e-4)
