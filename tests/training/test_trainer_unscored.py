"""Samples a reward cannot score (it returns None) take no part in the update; too many of them stop the run."""

from __future__ import annotations

import logging

import pytest
import torch
from trainer_helpers import log_history, make_trainer, never_scores, parameters, record_gradients, rollout_and_old, start

from vlm_rl.algorithms.masking import masked_mean
from vlm_rl.data.formats import load_samples
from vlm_rl.training.console import header
from vlm_rl.training.scoring import RewardCoverageError


def every_other_scored(prompts, completions, **kwargs):
    """The completion's length in characters for even positions of the batch, None ("cannot score") for odd ones."""
    return [float(len(c)) if i % 2 == 0 else None for i, c in enumerate(completions)]


def test_a_batch_nobody_can_score_changes_nothing(tmp_path, tiny_model_dir, synthetic_data_dir, caplog, capsys):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[never_scores], max_unscored_fraction=1.0, total_episodes=8)
    trainer.eval_dataset = load_samples(synthetic_data_dir / "test.jsonl")
    trainer.args.eval_num_samples = 4
    before = parameters(trainer.model)
    with caplog.at_level(logging.WARNING, logger="vlm_rl.training.trainer"):
        trainer.train()
    after = parameters(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # policy and value head untouched
    assert "no sample of the batch could be scored" in caplog.text
    [logged] = log_history(tmp_path / "run")
    assert logged["objective/unscored"] == 1.0
    # no score is missing, not 0 (nor nan): in the log, and on the console line
    assert not {"objective/scores", "objective/rlhf_reward", "eval/scores", "eval/scores_greedy"} & logged.keys() and "eval/kl" in logged
    lines = capsys.readouterr().out.splitlines()
    head, line = lines[lines.index(header())], lines[lines.index(header()) + 1]
    for title in ("reward", "eval", "eval_greedy"):
        end = head.index(title) + len(title)
        assert line[end - len(title) - 2 : end].strip() == "", (title, line)


def test_more_unscored_than_allowed_stops_the_run_naming_the_reward(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[never_scores], total_episodes=8)
    with pytest.raises(RewardCoverageError, match=r"'never_scores' returned None for 100%.*max_unscored_fraction"):
        trainer.train()


def test_unscored_samples_take_no_part_in_statistics_or_loss(tmp_path, tiny_model_dir, synthetic_data_dir):
    # The update from a batch where half the samples are unscored equals the update from the scored half alone.
    settings = dict(reward=[every_other_scored], max_unscored_fraction=0.5, learning_rate=1e-2)
    mixed, alone = (make_trainer(tmp_path / name, tiny_model_dir, synthetic_data_dir, **settings) for name in ("mixed", "alone"))
    for trainer in (mixed, alone):
        start(trainer)
    _, rollout, old = rollout_and_old(mixed)
    scored = torch.tensor([i % 2 == 0 for i in range(len(rollout))])
    assert torch.equal(old["unscored"].cpu(), ~scored)
    assert not old["train_mask"][~scored].any()
    train_mask = old["train_mask"]
    assert masked_mean(old["advantages"], train_mask).abs() < 1e-6  # whitened over the scored samples' tokens only
    assert old["advantages"][train_mask].var() == pytest.approx(1.0, rel=1e-4)  # unbiased, as `whiten` defines it

    keep = scored.nonzero().squeeze(1).tolist()
    half = rollout.select(keep)
    half_scored = {k: v[keep] if torch.is_tensor(v) else v for k, v in old.items() if k in ("logprobs", "ref_logprobs", "values", "entropy", "scores", "unscored")}
    half_old = {**half_scored, **alone.advantages(half, half_scored)}
    assert torch.allclose(half_old["advantages"][half.response_mask], old["advantages"][keep][half.response_mask], atol=1e-5)

    # Gradients, not Adam's steps: Adam would blow float noise in near-zero gradients up to full steps.
    a, b = record_gradients(mixed), record_gradients(alone)
    mixed.optimise(rollout, old)
    alone.optimise(half, half_old)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in a.values()))
    assert norm > 1e-2 and a.keys() == b.keys()  # a real signal
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5 * float(norm)), name
