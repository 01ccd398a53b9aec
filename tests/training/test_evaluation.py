"""Held-out evaluation during PPO with a reward that cannot score every sample: the mean is over the samples it
scored, and an evaluation it could score nothing of logs no score (the metric is missing), never 0."""

from __future__ import annotations

import statistics

import pytest
from trainer_helpers import make_trainer, start

from vlm_rl.data.formats import load_samples


def even_length_only(prompts, completions, **kwargs):
    """The completion's length when it is even; None ("cannot score") when it is odd."""
    return [float(len(c)) if len(c) % 2 == 0 else None for c in completions]


def never(prompts, completions, **kwargs):
    return [None] * len(completions)


@pytest.mark.parametrize("reward", [even_length_only, never])
def test_evaluation_means_over_the_scored_samples_only(tmp_path, tiny_model_dir, synthetic_data_dir, reward):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[reward], max_new_tokens=8, eval_num_samples=8)
    trainer.eval_dataset = load_samples(synthetic_data_dir / "test.jsonl")
    start(trainer)
    out = trainer.evaluate_policy()
    samples = [trainer.eval_dataset[i] for i in range(8)]
    rollout = trainer.make_rollout(samples, trainer.greedy_config)  # greedy: the same completions again
    lengths = [len(t) for t in trainer.processor.batch_decode(rollout.responses, skip_special_tokens=True)]
    scored = [n for n in lengths if n % 2 == 0]
    if reward is never or not scored:
        assert "eval/scores_greedy" not in out and "eval/scores" not in out
    else:
        assert 0 < len(scored) < len(lengths)  # some of each: a mean over all would differ
        assert out["eval/scores_greedy"] == pytest.approx(statistics.mean(scored))
    assert out["eval/kl_greedy"] == pytest.approx(0.0, abs=1e-5)  # the policy has not moved from its reference
