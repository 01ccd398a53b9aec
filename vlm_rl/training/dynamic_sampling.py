"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", section 3.2; verl's `filter_groups`): a group whose samples all
score the same gets advantage 0 and carries no signal, so it is dropped and further prompts are rolled out until the
batch holds `local_batch_size / num_generations` groups with signal, or `max_sampling_rounds` rollouts were made.

Each rank filters its own groups (a group stays whole on its rank) and keeps its batch size; a round is a whole
rollout of a local batch on every rank, and after each round one all-reduce tells every rank whether any rank is
still short, so all ranks make the same rollouts and issue the same collectives whatever their data (a rank already
full rolls out with the others; its extra groups are discarded). A rank still short after the last round fills its
batch with groups without signal, earliest first (they train as they would without dynamic sampling: KL and entropy
terms only), and says how many in `dynamic_sampling/filled_groups`.

The model forwards of step 3 (old policy, reference, values) run once, on the final batch; the rewards are called
once per round, on each round's rollout, and their results are kept with the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_rl.algorithms.advantages import groups_with_signal
from vlm_rl.rollout.batch import Rollout


@dataclass
class RoundResult:
    """One round's rollout, its samples and its rewards (`RolloutRewards.score`'s result)."""

    samples: list[dict]
    rollout: Rollout
    completions: list[str]
    columns: dict[str, list]
    combined: list[float | None]


def sample_with_signal(trainer, iteration: int) -> tuple[list[dict], Rollout, dict]:
    """(samples, rollout, scored) of iteration `iteration` for `trainer` (a PPOTrainer with dynamic_sampling): as
    steps 1-3 return them, plus `scored["dynamic_sampling"]`: (groups generated, groups without signal, groups
    without signal kept to fill the batch, rounds) on this rank."""
    args = trainer.args
    size = args.num_generations
    wanted = args.local_batch_size // size  # groups per rank
    rounds: list[RoundResult] = []
    with_signal, without = [], []  # (round, group) pairs, in the order they were generated
    for r in range(args.max_sampling_rounds):
        samples = trainer.batch_samples(iteration, round=r)
        rollout = trainer.make_rollout(samples)
        rounds.append(RoundResult(samples, rollout, *trainer.rewards.score(rollout, samples)))
        combined = rounds[-1].combined
        device = rollout.has_eos.device
        valid = torch.tensor([c is not None for c in combined], device=device)  # (B,)
        scores = trainer.outcome_scores(torch.tensor([0.0 if c is None else float(c) for c in combined], device=device), rollout.has_eos)
        for g, signal in enumerate(groups_with_signal(scores, valid, size).tolist()):
            (with_signal if signal else without).append((r, g))
        short = torch.tensor(float(len(with_signal) < wanted), device=trainer.accelerator.device)
        if trainer.sum_over_ranks(short) == 0:  # every rank has its batch: all stop after this same round
            break
    filled = max(0, wanted - len(with_signal))
    chosen = with_signal[:wanted] + without[:filled]
    samples, rollout, rewards = assemble(rounds, chosen, size, trainer.pad_id)
    scored = trainer.score(rollout, samples, rewards=rewards)
    counts = [len(with_signal) + len(without), len(without), filled, len(rounds)]
    scored["dynamic_sampling"] = torch.tensor(counts, dtype=torch.float64, device=trainer.accelerator.device)
    return samples, rollout, scored


def assemble(rounds: list[RoundResult], chosen: list[tuple[int, int]], size: int, pad_id: int) -> tuple[list[dict], Rollout, tuple]:
    """The groups `chosen` ((round, group) pairs) of `rounds` as one batch, in round order: (samples, rollout, the
    rewards' (completions, columns, combined))."""
    by_round: dict[int, list[int]] = {}
    for r, g in chosen:
        by_round.setdefault(r, []).extend(range(g * size, (g + 1) * size))
    samples, completions, combined, parts = [], [], [], []
    columns: dict[str, list] = {name: [] for name in rounds[0].columns}
    for r, rows in by_round.items():
        result = rounds[r]
        parts.append(result.rollout.select(rows))
        samples += [result.samples[i] for i in rows]
        completions += [result.completions[i] for i in rows]
        combined += [result.combined[i] for i in rows]
        for name, column in result.columns.items():
            columns[name] += [column[i] for i in rows]
    rollout = parts[0] if len(parts) == 1 else Rollout.concat(parts, pad_id)
    return samples, rollout, (completions, columns, combined)
