"""DAPO's dynamic sampling through the trainer: groups whose scores are all equal are dropped and further prompts
rolled out until the batch is full of groups with signal (or `max_sampling_rounds` is reached, then the batch is
filled with groups without signal and says how many); the logged fraction filtered and rounds are the numbers
recomputed from the prompts; the rewards are called once per sample. (On 2 ranks: test_estimators.py's 2-rank launch.)

The reward (`trainer_helpers.colour_questions_only`) gives 0, 1, 0, 1 on the groups of colour questions and 0
everywhere else, so which groups carry signal is known from the prompts alone (11 of the 32 prompts ask for a colour).
"""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import colour_questions_only, log_history, make_trainer, start

SETTINGS = dict(advantage_estimator="grpo", num_generations=4, dynamic_sampling=True, kl_coef=0.0, max_new_tokens=6,
                per_device_train_batch_size=4, gradient_accumulation_steps=2)  # 2 groups per iteration


def expected_rounds(trainer, iteration: int, wanted: int, max_rounds: int) -> tuple[list[list[str]], int]:
    """(the tasks of each round's groups, the rounds needed to find `wanted` colour groups), from the prompts alone."""
    rounds = []
    for r in range(max_rounds):
        samples = trainer.batch_samples(iteration, round=r)
        rounds.append([samples[g]["task"] for g in range(0, len(samples), 4)])
        if sum(t == "colour" for tasks in rounds for t in tasks) >= wanted:
            break
    return rounds, len(rounds)


def test_groups_without_signal_are_dropped_until_the_batch_is_full(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[colour_questions_only], **SETTINGS)
    start(trainer)
    calls = []
    original = trainer.rewards.score
    trainer.rewards.score = lambda rollout, samples: calls.append(len(samples)) or original(rollout, samples)
    iteration = next(i for i in range(16) if expected_rounds(trainer, i, 2, 10)[1] >= 3)  # an iteration that takes 3+ rounds
    rounds, n_rounds = expected_rounds(trainer, iteration, 2, 10)
    samples, rollout, scored = trainer.sample(iteration)
    old = {**scored, **trainer.advantages(rollout, scored)}

    assert len(rollout) == len(samples) == 8 and calls == [8] * n_rounds  # the rewards ran once per round, never again
    sources = [s["_source"] for s in samples]
    for g in range(0, 8, 4):  # two whole groups, both colour questions, each one prompt 4 times, scored 0, 1, 0, 1
        assert [s["task"] for s in samples[g : g + 4]] == ["colour"] * 4 and len(set(sources[g : g + 4])) == 1
        assert old["scores"][g : g + 4].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert old["advantages"][rollout.response_mask].abs().min() > 0.5  # every token trains
    # the joined batch holds the rounds' own responses: decoded, they are the completions the rewards scored
    assert trainer.processor.batch_decode(rollout.responses, skip_special_tokens=True) == old["completions"]
    # the old logprobs of the joined batch are its own (one forward over it)
    with torch.no_grad():
        logprobs = trainer.model(rollout, trainer.args.temperature)[0]
    assert torch.allclose(logprobs[rollout.response_mask], old["logprobs"][rollout.response_mask], atol=1e-5)

    metrics = trainer.metrics(rollout, old, {})
    generated = [t for tasks in rounds for t in tasks]
    assert metrics["dynamic_sampling/rounds"] == n_rounds
    assert metrics["dynamic_sampling/filtered_fraction"] == pytest.approx(sum(t != "colour" for t in generated) / len(generated))
    assert metrics["dynamic_sampling/filled_groups"] == 0


def test_after_the_last_round_the_batch_is_filled_with_groups_without_signal(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[colour_questions_only], **{**SETTINGS, "max_sampling_rounds": 1})
    start(trainer)
    iteration = next(i for i in range(16) if expected_rounds(trainer, i, 2, 1)[0][0].count("colour") < 2)
    tasks = expected_rounds(trainer, iteration, 2, 1)[0][0]
    samples, rollout, scored = trainer.sample(iteration)
    assert len(samples) == 8 and sorted(s["task"] for s in samples[::4]) == sorted(tasks)  # round 0's groups, all kept
    metrics = trainer.metrics(rollout, {**scored, **trainer.advantages(rollout, scored)}, {})
    assert metrics["dynamic_sampling/filled_groups"] == 2 - tasks.count("colour")
    assert metrics["dynamic_sampling/rounds"] == 1


def test_a_run_with_dynamic_sampling_trains_on_groups_with_signal_only(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[colour_questions_only], **{**SETTINGS, "total_episodes": 16})
    trainer.train()
    history = log_history(tmp_path / "run")
    assert len(history) == 2
    for logged in history:  # every group scored 0, 1, 0, 1: mean 0.5
        assert logged["objective/scores"] == 0.5 and logged["dynamic_sampling/filled_groups"] == 0
        assert 0 < logged["dynamic_sampling/filtered_fraction"] < 1 and logged["dynamic_sampling/rounds"] >= 1
        assert "objective/kl" not in logged  # kl_coef 0: no reference
