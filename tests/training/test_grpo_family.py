"""The GRPO family's knobs through the trainer: each field reaches the loss it names.

One rollout (grpo groups of 4, responses of 3-16 tokens, half of them cut at max_new_tokens) whose old logprobs are
moved ~0.3 nats off the policy's, so that both clip sides are active on the first step. For each setting (each set to
a value no other field has), the gradient the trainer's optimiser step would apply (clipping off, so no rescaling can
hide a factor) equals the one recomputed here from an independent forward and the pure loss
(`vlm_rl.algorithms.losses`, itself checked against TRL's GRPOTrainer in tests/algorithms/test_trl_oracle.py) with
the objective written out by hand; the logged clip fractions equal the fractions recomputed from the same logprobs.
Then the split invariance: 8x1 = 4x2 = 2x4 for every loss type whose definition allows it, and the ones that do not.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest
import torch
from trainer_helpers import completion_length, make_trainer, start

from vlm_rl.algorithms.advantages import grpo_advantages
from vlm_rl.algorithms.losses import LossNormaliser, PolicyObjective, high_entropy_mask, policy_loss, value_loss

GROUPS = dict(advantage_estimator="grpo", num_generations=4, max_new_tokens=16, max_grad_norm=0.0, cliprange=0.1)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_model_dir, synthetic_data_dir):
    """(trainer, rollout, scored): steps 1-3 of one iteration, the policy moved off the reference (a KL to weigh)
    and the old logprobs moved off the policy's (ratios to clip)."""
    trainer = make_trainer(
        tmp_path_factory.mktemp("family"), tiny_model_dir, synthetic_data_dir, reward=[completion_length],
        kl_coef=0.3, per_device_train_batch_size=4, gradient_accumulation_steps=2, **GROUPS,
    )  # fmt: skip
    start(trainer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in trainer.model.policy.named_parameters():
            if "visual" not in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    torch.manual_seed(0)
    samples = trainer.batch_samples(0)
    rollout = trainer.make_rollout(samples)
    scored = trainer.score(rollout, samples)
    g = torch.Generator().manual_seed(1)
    scored["logprobs"] = torch.where(rollout.response_mask, scored["logprobs"] + 0.3 * torch.randn(scored["logprobs"].shape, generator=g), 0.0)
    has_eos = rollout.has_eos
    assert has_eos.any() and not has_eos.all() and len(set(rollout.response_lengths.tolist())) > 2  # what the settings act on
    return trainer, rollout, scored


def configured(trainer, monkeypatch, **fields):
    """The trainer's args with `fields` set (and the config's own resolution of kl_estimator redone)."""
    for name, value in fields.items():
        monkeypatch.setattr(trainer.args, name, value)
    if "kl_in_loss" in fields and "kl_estimator" not in fields:
        monkeypatch.setattr(trainer.args, "kl_estimator", "k3" if fields["kl_in_loss"] else "k1")


def trainer_step(trainer, rollout, old, micro: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The raw gradient of one optimiser step on the whole batch (8 samples in order) split into micro-batches of
    `micro`, and the stats it logs; the weights are left as they were."""
    trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps = micro, 8 // micro
    grads, stats = {}, defaultdict(list)
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    trainer.model_wrapped.train()
    try:
        trainer.optimiser_step(rollout, old, torch.arange(8), stats)
    finally:
        trainer.optimizer.step = original
        trainer.model_wrapped.eval()
    return grads, stats


def expected_step(trainer, rollout, old, objective: PolicyObjective, micro: int, loss_mask, top_entropy: float = 1.0):
    """The same step recomputed: a forward per micro-batch, the pure loss with `objective`, the mini-batch's counts
    by hand; (gradient, clip fractions per micro-batch (low, high))."""
    trainer.model.zero_grad()
    normaliser = LossNormaliser(tokens=loss_mask.sum().float(), sequences=8.0, local_batches=8 // micro)
    fractions = []
    for start_row in range(0, 8, micro):
        rows = list(range(start_row, start_row + micro))
        logprobs, entropy, _ = trainer.model(rollout.select(rows), trainer.args.temperature)
        mask = loss_mask[rows]
        entropy_mask = high_entropy_mask(entropy, mask, top_entropy) if top_entropy < 1 else None
        loss, _ = policy_loss(logprobs, old["logprobs"][rows], old["advantages"][rows], mask, objective, normaliser,
                              ref_logprobs=old["ref_logprobs"][rows], entropy=entropy, entropy_mask=entropy_mask)
        loss.backward()
        log_ratio, a = torch.where(mask, logprobs.detach() - old["logprobs"][rows], 0.0), old["advantages"][rows]
        if objective.importance_sampling_level == "sequence":  # each token takes its sequence's geometric mean ratio
            log_ratio = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True)).expand_as(log_ratio)
        ratio = torch.exp(log_ratio)
        low = ((ratio < 1 - objective.epsilon_low) & (a < 0))[mask].float().mean().item()
        high = ((ratio > 1 + objective.upper) & (a > 0))[mask].float().mean().item()
        if objective.loss_type == "cispo":  # the weight is capped at epsilon_high itself, and nothing below
            low, high = 0.0, ((ratio > objective.upper) & (a > 0))[mask].float().mean().item()
        fractions.append((low, high))
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return grads, fractions


def assert_same_gradient(got: dict, want: dict, what) -> float:
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in want.values()))
    assert norm > 1e-3, what  # a real signal
    assert got.keys() == want.keys(), what
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5 * float(norm)), (what, name)
    return float(norm)


BASE = PolicyObjective(loss_type="dapo", epsilon_low=0.1, max_completion_length=16)  # the fixture's cliprange, max_new_tokens
SETTINGS = {
    # name: (PPOConfig fields, the objective they mean, written out by hand)
    "grpo": (dict(loss_type="grpo"), dict(loss_type="grpo")),
    "bnpo": (dict(loss_type="bnpo"), dict(loss_type="bnpo")),
    "dr_grpo": (dict(loss_type="dr_grpo"), dict(loss_type="dr_grpo")),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.15), dict(loss_type="cispo", epsilon_high=1.15)),
    "epsilon_high": (dict(epsilon_high=0.28), dict(epsilon_high=0.28)),
    "delta": (dict(epsilon_high=0.15, delta=1.2), dict(epsilon_high=0.15, delta=1.2)),
    "sequence": (dict(importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")),
    "kl_in_loss": (dict(kl_in_loss=True), dict(kl_coef=0.3, kl_estimator="k3")),
    "kl_in_loss_k2_no_correction": (dict(kl_in_loss=True, kl_estimator="k2", use_bias_correction_kl=False),
                                    dict(kl_coef=0.3, kl_estimator="k2", use_bias_correction_kl=False)),
    "entropy_coef": (dict(entropy_coef=0.07), dict(entropy_coef=0.07)),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_setting_reaches_the_loss(family, monkeypatch, name):
    trainer, rollout, scored = family
    fields, meant = SETTINGS[name]
    configured(trainer, monkeypatch, **fields)
    old = {**scored, **trainer.advantages(rollout, scored)}
    got, stats = trainer_step(trainer, rollout, old, micro=4)
    want, fractions = expected_step(trainer, rollout, old, PolicyObjective(**{**BASE.__dict__, **meant}), 4, rollout.response_mask)
    assert_same_gradient(got, want, name)
    assert [s.item() for s in stats["policy/clipfrac_low"]] == pytest.approx([f[0] for f in fractions], abs=1e-6)
    assert [s.item() for s in stats["policy/clipfrac_high"]] == pytest.approx([f[1] for f in fractions], abs=1e-6)
    assert max(f[1] for f in fractions) > 0 and (meant.get("loss_type") == "cispo" or max(f[0] for f in fractions) > 0)


def test_top_entropy_quantile_trains_on_the_high_entropy_tokens_of_each_micro_batch(family, monkeypatch):
    trainer, rollout, scored = family
    configured(trainer, monkeypatch, top_entropy_quantile=0.3)
    old = {**scored, **trainer.advantages(rollout, scored)}
    got, _ = trainer_step(trainer, rollout, old, micro=4)
    want, _ = expected_step(trainer, rollout, old, BASE, 4, rollout.response_mask, top_entropy=0.3)
    assert_same_gradient(got, want, "top_entropy_quantile")
    everything, _ = expected_step(trainer, rollout, old, BASE, 4, rollout.response_mask)
    assert not torch.allclose(next(iter(everything.values())), next(iter(want.values())))  # a different gradient


def test_mask_truncated_completions_leaves_cut_responses_out_of_the_loss(family, monkeypatch):
    trainer, rollout, scored = family
    configured(trainer, monkeypatch, mask_truncated_completions=True)
    old = {**scored, **trainer.advantages(rollout, scored)}
    ended = rollout.has_eos
    assert torch.equal(old["loss_mask"], rollout.response_mask & ended[:, None])
    assert torch.equal(old["train_mask"], rollout.response_mask)  # they still count in their group's statistics
    got, _ = trainer_step(trainer, rollout, old, micro=4)
    want, _ = expected_step(trainer, rollout, old, BASE, 4, rollout.response_mask & ended[:, None])
    assert_same_gradient(got, want, "mask_truncated_completions")


def test_kl_in_the_loss_leaves_the_rewards(family, monkeypatch):
    # With the KL in the loss, every token of sample i carries its group advantage A_i alone; with the KL in the reward
    # (the default), the reward-to-go of -kl_coef x KL is added.
    trainer, rollout, scored = family
    mask = rollout.response_mask
    scores = scored["scores"]
    outcome = grpo_advantages(scores, torch.ones(8, dtype=torch.bool), 4)  # (B,)
    configured(trainer, monkeypatch, kl_in_loss=True)
    in_loss = trainer.advantages(rollout, scored)
    assert torch.allclose(in_loss["advantages"][mask], outcome[:, None].expand_as(mask)[mask], atol=1e-6)
    configured(trainer, monkeypatch, kl_in_loss=False)
    in_reward = trainer.advantages(rollout, scored)
    assert not torch.allclose(in_reward["advantages"][mask], outcome[:, None].expand_as(mask)[mask], atol=1e-3)


def test_scale_rewards_batch_divides_by_the_batch_std(family, monkeypatch):
    trainer, rollout, scored = family
    configured(trainer, monkeypatch, scale_rewards="batch", kl_in_loss=True)
    scores = scored["scores"].tolist()
    std = statistics.stdev(scores)  # unbiased, over the whole batch
    by_hand = [(s - statistics.mean(scores[4 * (i // 4) : 4 * (i // 4) + 4])) / (std + 1e-4) for i, s in enumerate(scores)]
    advantages = trainer.advantages(rollout, scored)["advantages"]
    assert advantages[:, 0].tolist() == pytest.approx(by_hand, abs=1e-5)
    configured(trainer, monkeypatch, scale_rewards="group")
    assert trainer.advantages(rollout, scored)["advantages"][:, 0].tolist() != pytest.approx(by_hand, abs=1e-3)


def test_the_critic_s_value_loss_is_aggregated_by_the_loss_type(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    # gae (a shared critic) with loss_type grpo: policy and value losses are both means over responses of token means.
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], loss_type="grpo", max_new_tokens=16,
                           max_grad_norm=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    start(trainer)
    torch.manual_seed(0)
    samples = trainer.batch_samples(0)
    rollout = trainer.make_rollout(samples)
    scored = trainer.score(rollout, samples)
    scored["values"] = scored["values"] + 0.5  # values away from the returns and from themselves: clipped and not
    old = {**scored, **trainer.advantages(rollout, scored)}
    got, _ = trainer_step(trainer, rollout, old, micro=4)
    mask = rollout.response_mask
    normaliser = LossNormaliser(tokens=mask.sum().float(), sequences=8.0, local_batches=2)
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        logprobs, _, values = trainer.model(rollout.select(rows), trainer.args.temperature)
        objective = PolicyObjective(loss_type="grpo", epsilon_low=0.2, max_completion_length=16)
        loss = policy_loss(logprobs, old["logprobs"][rows], old["advantages"][rows], mask[rows], objective, normaliser)[0]
        loss = loss + 0.1 * value_loss(values, old["values"][rows], old["returns"][rows], mask[rows], 0.2, "grpo", normaliser)[0]
        loss.backward()
    want = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    assert_same_gradient(got, want, "value loss by loss_type")
    assert any(n.startswith("critic.") and g.abs().sum() > 0 for n, g in want.items())  # the value loss is in it


# ---- split invariance -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [dict(loss_type=t) for t in ("grpo", "dr_grpo", "dapo")]
    + [dict(loss_type="cispo", epsilon_high=1.15), dict(importance_sampling_level="sequence", kl_in_loss=True, epsilon_high=0.2)],
    ids=["grpo", "dr_grpo", "dapo", "cispo", "gspo_kl_in_loss"],
)
def test_the_gradient_does_not_depend_on_the_micro_batch_split(family, monkeypatch, fields):
    # grpo and dr_grpo divide by the mini-batch's sequence count, dapo and cispo by its token count, on all ranks:
    # each micro-batch's share adds up to the same loss however the mini-batch is split.
    trainer, rollout, scored = family
    configured(trainer, monkeypatch, **fields)
    old = {**scored, **trainer.advantages(rollout, scored)}
    whole, _ = trainer_step(trainer, rollout, old, micro=8)
    for micro in (4, 2):
        assert_same_gradient(trainer_step(trainer, rollout, old, micro=micro)[0], whole, (fields, micro))


@pytest.mark.parametrize("fields", [dict(loss_type="bnpo"), dict(entropy_coef=0.5), dict(top_entropy_quantile=0.3)], ids=["bnpo", "entropy_coef", "top_entropy_quantile"])
def test_the_per_micro_batch_definitions_depend_on_the_split(family, monkeypatch, fields):
    # By definition (TRL's): bnpo is the mean of each micro-batch's token mean, the entropy bonus the mean of each
    # micro-batch's mean entropy, and the top-entropy quantile is taken over each micro-batch. Responses of different
    # lengths weigh differently in different splits.
    trainer, rollout, scored = family
    configured(trainer, monkeypatch, **fields)
    old = {**scored, **trainer.advantages(rollout, scored)}
    whole, _ = trainer_step(trainer, rollout, old, micro=8)
    split, _ = trainer_step(trainer, rollout, old, micro=2)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in whole.values()))
    difference = torch.sqrt(sum(((split[n] - g).double() ** 2).sum() for n, g in whole.items()))
    assert difference > 1e-3 * norm
