"""The PPO trainer does what it says with a real signal: it learns, the KL holds it back, it resumes exactly,
and every logged figure is the number it names (recomputed here from the rollout, independently)."""

from __future__ import annotations

import statistics

import pytest
import torch
from trainer_helpers import (
    check_resume_reproduces_the_run,
    completion_length,
    log_history,
    make_trainer,
    negative_completion_length,
    parameters,
    rollout_and_old,
    sampled_lengths,
)
from transformers import Qwen2VLForConditionalGeneration

from vlm_rl.training import trainer as trainer_module
from vlm_rl.algorithms.advantages import compute_gae, shape_rewards, whiten
from vlm_rl.rollout.logprobs import response_logprobs

# A reward the tiny random model can learn in seconds: characters in the completion (eos early = short).
LEARNING = dict(
    learning_rate=1e-2, per_device_train_batch_size=8, gradient_accumulation_steps=1, num_ppo_epochs=4, max_new_tokens=8
)


def run(tmp_path, tiny_model_dir, synthetic_data_dir, reward, **overrides):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[reward], **{**LEARNING, "total_episodes": 160, **overrides})
    trainer.train()
    return trainer


def test_ppo_learns_the_reward_and_its_negation(tmp_path, tiny_model_dir, synthetic_data_dir):
    # Measured from fresh samples, not from the logged scores (which a flipped score sign would flip too).
    start = sampled_lengths(make_trainer(tmp_path / "start", tiny_model_dir, synthetic_data_dir, **LEARNING))
    up = sampled_lengths(run(tmp_path / "up", tiny_model_dir, synthetic_data_dir, completion_length, kl_coef=0.0))
    down = sampled_lengths(run(tmp_path / "down", tiny_model_dir, synthetic_data_dir, negative_completion_length, kl_coef=0.0))
    assert up > start + 20, (start, up)  # measured: 18.4 -> 68.6 characters
    assert down < start - 10, (start, down)  # measured: 18.4 -> 1.4


def test_a_large_kl_coef_holds_the_policy_near_its_reference(tmp_path, tiny_model_dir, synthetic_data_dir):
    free = run(tmp_path / "free", tiny_model_dir, synthetic_data_dir, completion_length, kl_coef=0.0)
    held = run(tmp_path / "held", tiny_model_dir, synthetic_data_dir, completion_length, kl_coef=20.0)
    assert free.ref_model is None and held.ref_model is not None  # kl_coef 0: no reference loaded (TRL's beta 0)
    free_log, held_log = log_history(tmp_path / "free" / "run"), log_history(tmp_path / "held" / "run")
    assert all("objective/kl" not in h for h in free_log)  # ... nor run: no KL to log
    free_kl, held_kl = kl_to_the_start(free, tiny_model_dir), kl_to_the_start(held, tiny_model_dir)
    assert free_kl > 10  # measured: 43.6 nats per sequence
    assert held_kl < 0.25 * free_kl  # measured: 3.6
    assert held_log[-1]["objective/kl"] == pytest.approx(held_kl, rel=0.5)  # the logged KL measures the same
    assert held_log[0]["objective/kl"] == 0.0  # the first rollout is sampled from the reference itself


def kl_to_the_start(trainer, tiny_model_dir) -> float:
    """The k1 KL per sequence between the trainer's policy and a freshly loaded starting model, on a fresh rollout."""
    torch.manual_seed(0)
    rollout = trainer.make_rollout(trainer.batch_samples(0))
    policy, ref = independent_logprobs(trainer, tiny_model_dir, rollout)
    return torch.where(rollout.response_mask, policy - ref, 0.0).sum(1).mean().item()


def test_resume_with_a_real_signal_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, synthetic_data_dir):
    settings = {**LEARNING, "total_episodes": 32, "kl_coef": 0.5, "num_ppo_epochs": 2}
    history = check_resume_reproduces_the_run(tmp_path, tiny_model_dir, synthetic_data_dir, [completion_length], **settings)
    run = tmp_path / "a" / "run"
    weights = [parameters(Qwen2VLForConditionalGeneration.from_pretrained(run / f"checkpoint-{k}")) for k in (1, 2, 4)]
    for before, after in zip(weights, weights[1:]):
        language = [n for n in before if "visual" not in n]  # the vision tower is frozen
        moved = sum(not torch.equal(before[n], after[n]) for n in language)
        assert moved > 0.8 * len(language)  # the weights move between checkpoints (a signal to reproduce)
    assert all(h["objective/kl"] != 0 for h in history[1:]) and len({h["objective/scores"] for h in history}) > 1


# ---- the logged numbers, recomputed -------------------------------------------------------------------


@pytest.fixture(scope="module")
def moved(tmp_path_factory, tiny_model_dir, synthetic_data_dir):
    """A trainer whose policy three iterations of PPO moved away from the reference (the starting model)."""
    tmp_path = tmp_path_factory.mktemp("moved")
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length],
        **{**LEARNING, "total_episodes": 24, "kl_coef": 0.5, "num_ppo_epochs": 2, "lr_scheduler_type": "constant"},
    )
    trainer.train()
    return trainer


def independent_logprobs(trainer, tiny_model_dir, rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's and a freshly loaded starting model's logprobs of the rollout. (B, T_r) each"""
    reference = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        policy, _ = response_logprobs(trainer.model.policy, rollout, trainer.args.temperature)
        ref, _ = response_logprobs(reference, rollout, trainer.args.temperature)
    return policy, ref


def ended(trainer, rollout) -> torch.Tensor:
    """Whether each response holds an eos token, from the token ids alone. (B,)"""
    eos = torch.tensor(sorted(trainer.eos_ids))
    return torch.isin(rollout.responses, eos).any(dim=1)


def test_logged_metrics_are_the_numbers_they_name(moved, tiny_model_dir, monkeypatch):
    trainer, args = moved, moved.args
    samples, rollout, old = rollout_and_old(trainer, iteration=1, seed=7)
    policy, ref = independent_logprobs(trainer, tiny_model_dir, rollout)
    mask = rollout.response_mask  # (B, T_r)
    kl = torch.where(mask, policy - ref, 0.0).sum(1)  # (B,) k1 summed over each response
    lengths = [float(len(c)) for c in trainer.processor.batch_decode(rollout.responses, skip_special_tokens=True)]

    seen = []  # each micro-batch's policy-loss inputs, to recompute the clip fractions
    real_policy_loss = trainer_module.policy_loss

    def recording_policy_loss(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        seen.append((logprobs.detach(), old_logprobs, advantages, mask))
        return real_policy_loss(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_loss", recording_policy_loss)
    metrics = trainer.metrics(rollout, old, trainer.optimise(rollout, old))

    assert kl.mean() > 0.5  # the policy has moved: a KL with a sign to get wrong
    assert metrics["objective/kl"] == pytest.approx(kl.mean().item(), abs=1e-4)
    assert metrics["objective/non_score_reward"] == pytest.approx(-args.kl_coef * kl.mean().item(), abs=1e-4)
    assert metrics["objective/scores"] == pytest.approx(statistics.mean(lengths), abs=1e-5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(statistics.mean(lengths) - args.kl_coef * kl.mean().item(), abs=1e-4)
    assert metrics["val/num_eos_tokens"] == ended(trainer, rollout).sum().item()
    assert metrics["val/response_length"] == pytest.approx(mask.sum(1).float().mean().item())
    clipfracs, lows, highs = [], [], []
    for logprobs, old_logprobs, advantages, m in seen:
        ratio = torch.exp(logprobs - old_logprobs)
        clipped = (advantages * ratio > advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))[m]
        clipfracs.append(clipped.float().mean().item())
        lows.append(((ratio < 1 - args.cliprange) & (advantages < 0))[m].float().mean().item())
        highs.append(((ratio > 1 + args.cliprange) & (advantages > 0))[m].float().mean().item())
    assert len(seen) == args.num_ppo_epochs * args.num_mini_batches * args.gradient_accumulation_steps
    assert max(clipfracs) > 0 and max(lows) > 0 and max(highs) > 0  # the second epoch is off-policy enough to clip
    assert metrics["policy/clipfrac_avg"] == pytest.approx(statistics.mean(clipfracs), abs=1e-6)
    assert metrics["policy/clipfrac_low"] == pytest.approx(statistics.mean(lows), abs=1e-6)
    assert metrics["policy/clipfrac_high"] == pytest.approx(statistics.mean(highs), abs=1e-6)


def test_missing_eos_penalty_is_subtracted_from_responses_without_eos(moved, monkeypatch):
    monkeypatch.setattr(moved.args, "missing_eos_penalty", 3.0)
    for seed in range(50):  # the first sampling seed whose batch has responses with and without eos
        _, rollout, old = rollout_and_old(moved, iteration=1, seed=seed)
        no_eos = ~ended(moved, rollout)
        if no_eos.any() and not no_eos.all():
            break
    assert no_eos.any() and not no_eos.all()
    lengths = torch.tensor([float(len(c)) for c in old["completions"]])
    assert torch.equal(old["scores"], lengths - 3.0 * no_eos.float())


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_is_the_one_configured(moved, tiny_model_dir, monkeypatch, estimator):
    monkeypatch.setattr(moved.args, "kl_estimator", estimator)
    _, rollout, old = rollout_and_old(moved, iteration=1, seed=7)
    policy, ref = independent_logprobs(moved, tiny_model_dir, rollout)
    log_ratio = policy - ref
    expected = {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.exp(-log_ratio) - 1 + log_ratio}[estimator]
    mask = rollout.response_mask
    assert torch.allclose(old["kl"][mask], expected[mask], atol=1e-4)


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_whiten_rewards_whitens_the_shaped_rewards_before_gae(moved, monkeypatch, whiten_rewards):
    args = moved.args
    monkeypatch.setattr(args, "whiten_rewards", whiten_rewards)
    _, rollout, old = rollout_and_old(moved, iteration=1, seed=7)
    mask = rollout.response_mask
    rewards = shape_rewards(old["scores"], old["kl"], mask, args.kl_coef)
    expected = {}
    for whitened in (False, True):
        r = whiten(rewards, mask, shift_mean=False) if whitened else rewards
        expected[whitened] = whiten(compute_gae(r, old["values"], mask, args.gamma, args.lam)[0], mask)
    assert torch.allclose(old["advantages"][mask], expected[whiten_rewards][mask], atol=1e-5)
    assert not torch.allclose(expected[True][mask], expected[False][mask], atol=1e-3)  # the flag matters here


# ---- evaluation during PPO ------------------------------------------------------------------------------


def test_evaluation_logs_held_out_rewards_and_changes_nothing_in_training(tmp_path, tiny_model_dir, synthetic_data_dir):
    from vlm_rl.evaluation.statistics import read_training_curves
    from vlm_rl.data.formats import load_samples

    settings = {**LEARNING, "reward": [completion_length], "total_episodes": 32, "kl_coef": 0.5}
    plain = make_trainer(tmp_path / "plain", tiny_model_dir, synthetic_data_dir, **settings)
    plain.train()
    evaluated = make_trainer(tmp_path / "eval", tiny_model_dir, synthetic_data_dir, **settings, eval_steps=2, eval_num_samples=6)
    evaluated.eval_dataset = load_samples(synthetic_data_dir / "test.jsonl")
    evaluated.train()
    history = log_history(tmp_path / "eval" / "run")
    assert [("eval/scores" in h) for h in history] == [False, True, False, True]
    for want, got in zip(log_history(tmp_path / "plain" / "run"), history):  # training is untouched by evaluation
        assert {k: v for k, v in got.items() if not k.startswith("eval/") and k != "eps"} == {k: v for k, v in want.items() if k != "eps"}
    # Recomputed: the policy at the end, greedy on the 6 held-out prompts (greedy needs no seed).
    samples = [evaluated.eval_dataset[i] for i in range(6)]
    rollout = evaluated.make_rollout(samples, evaluated.greedy_config)
    lengths = [len(t) for t in evaluated.processor.batch_decode(rollout.responses, skip_special_tokens=True)]
    assert history[-1]["eval/scores_greedy"] == pytest.approx(statistics.mean(lengths))
    assert history[-1]["eval/kl"] > 0 and history[-1]["eval/kl_greedy"] != history[-1]["eval/kl"]
    curves = read_training_curves(tmp_path / "eval" / "run")  # what compare's report plots
    assert [step for step, _ in curves["eval/scores"]] == [2, 4]


def test_skip_long_prompts_drops_long_held_out_prompts_too(tmp_path, tiny_model_dir, synthetic_data_dir):
    """`vlm-rl ppo` with skip_long_prompts and an eval set holding prompts over max_prompt_length: they are dropped
    as the training set's are (not a PromptTooLongError at the first evaluation), and evaluation runs on the rest."""
    from vlm_rl.data.formats import load_samples
    from vlm_rl.data.prompts import prompt_lengths
    from vlm_rl.ppo import build_trainer
    from trainer_helpers import make_config

    # The synthetic prompts are 36-50 tokens long: 41 keeps some of each set, not all.
    config = make_config(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=["trainer_helpers:completion_length"], skip_long_prompts=True,
        max_prompt_length=41, eval_data=str(synthetic_data_dir / "test.jsonl"), eval_num_samples=4, total_episodes=8,
    )  # fmt: skip
    trainer = build_trainer(config)
    held_out = load_samples(synthetic_data_dir / "test.jsonl")
    lengths = prompt_lengths(trainer.processor, held_out)
    kept = [held_out[i]["_source"] for i, n in enumerate(lengths) if n <= 41]
    assert 4 <= len(kept) < len(held_out)
    assert [trainer.eval_dataset[i]["_source"] for i in range(len(trainer.eval_dataset))] == kept
    trainer.train()
    [logged] = log_history(tmp_path / "run")
    assert logged["eval/scores"] >= 0 and logged["eval/scores_greedy"] >= 0
