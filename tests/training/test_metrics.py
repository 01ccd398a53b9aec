"""Metrics: the one all-reduce (training/metrics.py) on simulated ranks, and the optimisation statistics
recomputed from each micro-batch's own forward, with clip ranges and a temperature that no default shares."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch
from test_optimise import DISTINCT
from trainer_helpers import completion_length, make_trainer, rollout_and_old, start

from vlm_rl.training.metrics import MetricSums, iteration_metrics


def two_ranks(other: MetricSums):
    """An all-reduce that adds what another rank holds (the same layout: the test builds it the same way)."""

    def all_reduce_sum(packed: torch.Tensor) -> torch.Tensor:
        names = list(other.sums)
        theirs = torch.stack([torch.stack(other.sums[n]) for n in names])
        return packed + theirs

    return all_reduce_sum


def test_sums_over_ranks_means_totals_and_missing():
    mine, theirs = MetricSums(torch.device("cpu")), MetricSums(torch.device("cpu"))
    mine.mean("kl", torch.tensor([1.0, 2.0, 3.0]))
    theirs.mean("kl", torch.tensor([10.0]))
    mine.rank_mean("clip", [torch.tensor(0.2), torch.tensor(0.4)])  # this rank: 0.3
    theirs.rank_mean("clip", [])  # a rank without micro-batch statistics does not count
    mine.total("eos", torch.tensor([1.0, 0.0, 1.0]))
    theirs.total("eos", torch.tensor([1.0]))
    mine.mean("scores", torch.tensor([]))  # nothing scored anywhere: missing, not 0
    theirs.mean("scores", torch.tensor([]))
    out = mine.reduce(two_ranks(theirs))
    assert out == {"kl": pytest.approx(4.0), "clip": pytest.approx(0.3), "eos": 3.0}
    assert list(out) == ["kl", "clip", "eos"]


def test_one_collective_whatever_the_data():
    calls = []
    m = MetricSums(torch.device("cpu"))
    m.rank_mean("a", [])
    m.mean("b", torch.tensor([]))
    assert m.reduce(lambda t: calls.append(t.shape) or t) == {}
    assert calls == [(2, 2)]  # one all-reduce, its layout fixed by the names alone


def test_iteration_metrics_on_a_rank_whose_samples_are_all_unscored():
    rollout = SimpleNamespace(has_eos=torch.tensor([True, False]), response_mask=torch.tensor([[True, True], [True, False]]), trajectories=None)
    old = {
        "unscored": torch.tensor([True, True]), "kl": torch.tensor([[0.1, 0.2], [0.3, 0.0]]), "entropy": torch.ones(2, 2),
        "scores": torch.zeros(2), "reward_columns": {"r": [None, None]},
    }  # fmt: skip
    names = ("policy/clipfrac_avg", "train/skipped_steps")
    seen = []
    out = iteration_metrics(rollout, old, {}, names, 0.5, lambda t: seen.append(t) or t, torch.device("cpu"))
    assert len(seen) == 1
    assert "objective/scores" not in out and "objective/scores/r" not in out and "policy/clipfrac_avg" not in out
    assert out["objective/kl"] == pytest.approx(0.3) and out["objective/entropy"] == pytest.approx(2.0)
    assert out["val/num_eos_tokens"] == 1.0 and out["objective/unscored"] == 1.0


def sequence_entropy(policy, rollout, temperature: float) -> torch.Tensor:
    """Each response's summed per-token entropy of the sampling distribution (softmax(logits / T)), from a full
    Hugging Face forward: every logit materialised, independently of the project's response-only path. (B,)"""
    with torch.no_grad():
        logits = policy(**rollout.model_inputs(policy), use_cache=False).logits[:, rollout.context_length - 1 : -1]
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    per_token = -(logprobs.exp() * logprobs).sum(-1)  # (B, T_r)
    return torch.where(rollout.response_mask, per_token, 0.0).sum(1)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model_dir, synthetic_data_dir):
    """One iteration's rollout and optimisation (2 epochs, so the second is off-policy), with every training forward's
    outputs recorded per micro-batch."""
    trainer = make_trainer(tmp_path_factory.mktemp("metrics"), tiny_model_dir, synthetic_data_dir, reward=[completion_length], **{**DISTINCT, "num_ppo_epochs": 2, "cliprange_value": 0.02})
    start(trainer)
    _, rollout, old = rollout_and_old(trainer, seed=5)
    unscored = torch.arange(len(rollout)) % 3 == 0  # masks that are not all-True: a mean over padding would show
    out = ~unscored[:, None]
    old = {**old, "unscored": unscored, "train_mask": old["train_mask"] & out, "loss_mask": old["loss_mask"] & out}
    entropy = sequence_entropy(trainer.model.policy, rollout, trainer.args.temperature)  # of the policy that sampled
    forwards = []
    model = trainer.model_wrapped
    real_forward = model.forward

    def recording_forward(mb, temperature, where="policy forward"):
        out = real_forward(mb, temperature, where)
        if where == "training forward":
            forwards.append(([rollout.sources.index(s) for s in mb.sources], *(t.detach() for t in out)))
        return out

    model.forward = recording_forward
    stats = trainer.optimise(rollout, old)
    model.forward = real_forward
    return trainer, rollout, old, stats, forwards, entropy


def test_optimisation_statistics_are_the_numbers_they_name(recorded):
    trainer, rollout, old, stats, forwards, _ = recorded
    args = trainer.args
    metrics = trainer.metrics(rollout, old, stats)
    approxkl, entropy, vclip, pclip = [], [], [], []
    for idx, logprobs, ent, values in forwards:
        mask = old["loss_mask"][idx]
        log_ratio = (logprobs - old["logprobs"][idx])[mask]
        approxkl.append(0.5 * (log_ratio**2).mean().item())
        entropy.append(ent[mask].mean().item())
        adv, ratio = old["advantages"][idx][mask], log_ratio.exp()
        pclip.append((-adv * ratio.clamp(1 - args.cliprange, 1 + args.cliprange) > -adv * ratio).float().mean().item())
        v, old_v, ret = values[mask], old["values"][idx][mask], old["returns"][idx][mask]
        clipped = old_v + (v - old_v).clamp(-args.cliprange_value, args.cliprange_value)
        vclip.append(((clipped - ret) ** 2 > (v - ret) ** 2).float().mean().item())
    assert len(forwards) == args.num_ppo_epochs * args.gradient_accumulation_steps
    assert max(pclip) > 0 and max(vclip) > 0  # the second epoch clips: the ranges matter
    assert metrics["policy/approxkl_avg"] == pytest.approx(statistics.mean(approxkl), rel=1e-5)
    assert metrics["policy/entropy_avg"] == pytest.approx(statistics.mean(entropy), rel=1e-5)
    assert metrics["policy/clipfrac_avg"] == pytest.approx(statistics.mean(pclip), abs=1e-6)
    assert metrics["val/clipfrac_avg"] == pytest.approx(statistics.mean(vclip), abs=1e-6)


def test_objective_entropy_is_the_sampling_distributions_entropy_per_sequence(recorded):
    trainer, rollout, old, stats, _, entropy = recorded
    metrics = trainer.metrics(rollout, old, stats)
    assert metrics["objective/entropy"] == pytest.approx(entropy.mean().item(), rel=1e-4)
