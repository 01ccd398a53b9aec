"""The optimisation step against an independent recomputation, with nothing that could hide a wrong scale: raw
gradients (clipping off, before Adam), parameters set to values no other parameter has, and the edges nobody
reaches by accident (a wholly unscored mini-batch among several, skipped steps that are not in a row, a finite loss
with a non-finite gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import completion_length, log_history, make_trainer, parameters, record_gradients, rollout_and_old, start

from vlm_rl.algorithms.losses import past_target_kl
from vlm_rl.training import trainer as trainer_module

# Every coefficient distinct from every other and from its default (cliprange 0.2 = cliprange_value 0.2, gamma 1,
# temperature 1 would hide a swapped or dropped one).
DISTINCT = dict(
    cliprange=0.13, cliprange_value=0.31, vf_coef=0.37, kl_coef=0.07, gamma=0.93, lam=0.81, temperature=0.7,
    max_grad_norm=0.0,  # no clipping: a pure rescaling of the loss must show in the gradient
    per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=1, num_ppo_epochs=1,
    learning_rate=1e-2, max_new_tokens=8,
)  # fmt: skip


def reference_loss(trainer, rollout, old, idx: list[int]) -> torch.Tensor:
    """PPO's loss over the whole mini-batch `idx` in ONE forward, written out here from the definitions (not with the
    project's loss functions): clipped surrogate + vf_coef x 0.5 x clipped squared error, each a token mean over
    the mini-batch's valid tokens."""
    args = trainer.args
    mb = rollout.select(idx)
    logprobs, _, values = trainer.model(mb, args.temperature)
    mask = old["loss_mask"][idx]
    adv, old_lp = old["advantages"][idx], old["logprobs"][idx]
    ratio = torch.exp(logprobs - old_lp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))
    old_v, ret = old["values"][idx], old["returns"][idx]
    v_clipped = old_v + (values - old_v).clamp(-args.cliprange_value, args.cliprange_value)
    vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clipped - ret) ** 2)
    n = mask.sum()
    return pg[mask].sum() / n + args.vf_coef * vf[mask].sum() / n


def raw_gradients(trainer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return grads


def norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


@pytest.fixture()
def trainer(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **DISTINCT)
    start(trainer)
    return trainer


def off_policy(old: dict) -> dict:
    """`old` as a later epoch sees it: ratios away from 1 and values away from the old ones, so that both clip ranges
    act (at the first step of an epoch nothing is clipped, and a swapped clip range could not show)."""
    g = torch.Generator().manual_seed(0)
    noise = lambda t, s: t + s * torch.randn(t.shape, generator=g)  # noqa: E731
    return {**old, "logprobs": noise(old["logprobs"], 0.3), "values": noise(old["values"], 0.5)}


def test_the_step_uses_the_raw_gradient_of_the_mini_batch_token_mean(trainer):
    _, rollout, old = rollout_and_old(trainer, seed=3)
    old = off_policy(old)
    mini = list(range(len(rollout)))
    trainer.model.train()
    want = raw_gradients(trainer, reference_loss(trainer, rollout, old, mini))
    got = record_gradients(trainer)
    stats = {k: [] for k in trainer.step_stat_names}
    trainer.optimiser_step(rollout, old, torch.tensor(mini), stats)
    assert norm(want) > 1e-2  # a real signal
    assert got.keys() == want.keys()
    scale = norm(want)
    for name, g in want.items():  # two micro-batches against one forward: another GEMM layout, hence a tolerance
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert float(stats["train/grad_norm"][0]) == pytest.approx(scale, rel=1e-4)  # the logged norm is the raw one
    assert 0 < float(stats["policy/clipfrac_avg"][0]) < 1 and 0 < float(stats["val/clipfrac_avg"][0]) < 1  # both ranges act


def test_the_value_loss_trains_the_shared_backbone(trainer):
    with torch.no_grad():  # a head that has learned something (a fresh head is 0, and passes no gradient back)
        trainer.model.critic.head.summary.weight.normal_(0, 0.1)
    _, rollout, old = rollout_and_old(trainer, seed=3)
    old = {**old, "advantages": torch.zeros_like(old["advantages"])}  # no policy gradient: only the value loss
    # Values away from the returns, so that the value loss has a gradient.
    old["returns"] = old["returns"] + 1.0
    mini = list(range(len(rollout)))
    trainer.model.train()
    want = raw_gradients(trainer, reference_loss(trainer, rollout, old, mini))
    got = record_gradients(trainer)
    trainer.optimiser_step(rollout, old, torch.tensor(mini), {k: [] for k in trainer.step_stat_names})
    backbone = [n for n in want if n.startswith("policy.model.language_model.layers.") and n.endswith("weight")]
    assert backbone and all(float(want[n].abs().max()) > 0 for n in backbone)  # the value loss reaches the backbone
    for name in backbone:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * norm(want), msg=name)


def test_a_wholly_unscored_mini_batch_among_several_takes_no_step(trainer):
    _, rollout, old = rollout_and_old(trainer, seed=3)
    unscored = torch.tensor([i < 4 for i in range(len(rollout))])  # samples 0-3: the first mini-batch, unscored
    out = ~unscored[:, None]
    old = {**old, "unscored": unscored, "train_mask": old["train_mask"] & out, "loss_mask": old["loss_mask"] & out}
    before = parameters(trainer.model)
    stats = {k: [] for k in trainer.step_stat_names}
    trainer.optimiser_step(rollout, old, torch.arange(0, 4), stats)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # nothing moved
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())  # nothing left accumulated
    assert stats["train/skipped_steps"] == [] and trainer.skipped_in_a_row == 0  # not a skipped (non-finite) step
    trainer.optimiser_step(rollout, old, torch.arange(4, 8), stats)  # the scored one steps
    assert [float(s) for s in stats["train/skipped_steps"]] == [0.0]
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {1}


def test_skipped_steps_that_are_not_in_a_row_do_not_stop_the_run(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    real_value_loss = trainer_module.value_loss
    calls = []

    def nan_at_steps_1_and_3(*args):  # one micro-batch per step here
        loss, stats = real_value_loss(*args)
        calls.append(1)
        return (loss * math.nan if len(calls) in (1, 3) else loss), stats

    monkeypatch.setattr(trainer_module, "value_loss", nan_at_steps_1_and_3)
    settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_ppo_epochs=2, total_episodes=16, max_skipped_steps=2)
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **settings)
    trainer.train()  # steps 1 and 3 skipped, 2 and 4 taken: never 2 in a row
    assert [h["train/skipped_steps"] for h in log_history(tmp_path / "run")] == [1.0, 1.0]
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2}


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_step(trainer):
    _, rollout, old = rollout_and_old(trainer, seed=3)
    head = trainer.model.critic.head.summary.weight
    hook = head.register_hook(lambda g: g * math.inf)  # the loss stays finite; this gradient does not
    before = parameters(trainer.model)
    stats = {k: [] for k in trainer.step_stat_names}
    try:
        trainer.optimiser_step(rollout, old, torch.arange(len(rollout)), stats)
    finally:
        hook.remove()
    assert [float(s) for s in stats["train/skipped_steps"]] == [1.0] and trainer.skipped_in_a_row == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())  # the bad gradient is gone


def one_iteration_of_8_steps(tmp_path, model_dir, data_dir, target_kl: float) -> tuple[list[float], dict, int]:
    """One iteration (8 prompts, 4 mini-batches of 2, 2 epochs: 8 steps at most) by hand; returns each step's
    returned approximate KL, the iteration's statistics and the number of optimiser steps taken."""
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, num_mini_batches=4, num_ppo_epochs=2, total_episodes=8,
                    learning_rate=3e-2, target_kl=target_kl)  # fmt: skip
    trainer = make_trainer(tmp_path, model_dir, data_dir, reward=[completion_length], **settings)
    start(trainer)
    _, rollout, old = rollout_and_old(trainer, seed=5)
    kls, real_step = [], trainer.optimiser_step

    def recording_step(*args):
        kls.append(real_step(*args))
        return kls[-1]

    trainer.optimiser_step = recording_step
    stats = trainer.optimise(rollout, old)
    return kls, stats, {int(s["step"]) for s in trainer.optimizer.state.values()}.pop()


def test_target_kl_makes_the_step_that_passes_it_the_iterations_last(tmp_path, tiny_model_dir, synthetic_data_dir):
    assert past_target_kl(0.151, 0.1) and not past_target_kl(0.149, 0.1) and not past_target_kl(1e9, None)  # 1.5 x, as TRL and SB3
    # A target no step reaches: all 8 steps, each returning the mean of its micro-batches' approxkl.
    kls, stats, steps = one_iteration_of_8_steps(tmp_path / "free", tiny_model_dir, synthetic_data_dir, target_kl=1e9)
    assert steps == 8 and len(kls) == 8 and [float(s) for s in stats["train/stopped_early"]] == [0.0]
    assert kls == pytest.approx([float(k) for k in stats["policy/approxkl_avg"]])  # one micro-batch per step here
    # A target between two steps' KLs: the first step above 1.5 x target is the last one taken (same run until then).
    j = next(i for i in (1, 2) if kls[i] > 1.2 * max(kls[:i]))  # within the first epoch, clearly past every step before it
    target = (kls[j] + max(kls[:j])) / 2 / 1.5
    stopped, stats, steps = one_iteration_of_8_steps(tmp_path / "stopped", tiny_model_dir, synthetic_data_dir, target_kl=target)
    assert steps == j + 1 and stopped == pytest.approx(kls[: j + 1], rel=1e-4)
    assert [float(s) for s in stats["train/stopped_early"]] == [1.0]
