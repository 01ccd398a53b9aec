"""The metrics of one PPO iteration under TRL's names, summed over ranks in ONE all-reduce whose layout depends on
the config alone, never on the data: every rank issues the same collective whatever its batch held (a rank whose
samples were all unscored, or that skipped every step, still takes part). A metric no rank could measure is left
out (missing, not 0)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class MetricSums:
    """Per metric, this rank's (sum, count); `reduce` adds both over the ranks and divides."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.totals: set[str] = set()

    def _put(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        self.sums[name] = (total.detach().double().to(self.device), torch.as_tensor(count, dtype=torch.float64, device=self.device))

    def mean(self, name: str, values: torch.Tensor) -> None:
        """The mean of `values` over every element of every rank."""
        self._put(name, values.sum(), values.numel())

    def rank_mean(self, name: str, values: list[torch.Tensor]) -> None:
        """The mean over ranks of each rank's mean of `values` (TRL's mean of micro-batch means); a rank without
        values does not count."""
        present = len(values) > 0
        self._put(name, torch.stack(values).float().mean() if present else torch.zeros(()), float(present))

    def ratio(self, name: str, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        """The sum of `numerator` over ranks divided by the sum of `denominator`."""
        self._put(name, numerator, denominator)

    def total(self, name: str, value: torch.Tensor) -> None:
        """The sum of `value` over ranks."""
        self._put(name, value.sum(), 1.0)
        self.totals.add(name)

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """{name: value} over all ranks, in the order the metrics were added; `all_reduce_sum` is called once."""
        names = list(self.sums)
        packed = torch.stack([torch.stack(self.sums[n]) for n in names]) if names else torch.zeros((0, 2), dtype=torch.float64, device=self.device)
        sums, counts = all_reduce_sum(packed).unbind(-1)  # (n_metrics,) each
        return {
            name: float(s) if name in self.totals else float(s / c)
            for name, s, c in zip(names, sums.tolist(), counts.tolist())
            if c > 0
        }


def iteration_metrics(
    rollout,
    old: dict,
    stats: dict[str, list[torch.Tensor]],
    stat_names: Iterable[str],
    kl_coef: float,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> dict[str, float]:
    """TRL's PPO metrics of one iteration: KL and entropy per sequence (summed over tokens; no KL without a KL term,
    `old["kl"]` None), scores as means over the samples the rewards could score, the optimisation statistics `stats`
    (lists per name; `stat_names` is the fixed list the config produces) as means over ranks, and with dynamic
    sampling the fraction of groups it filtered out, the rounds it took and the groups without signal it kept to fill
    the batch. `kl_coef` is the KL's weight in the reward."""
    m = MetricSums(device)
    scored = ~old["unscored"]  # (B,)
    non_score = torch.zeros_like(old["scores"])  # (B,)
    if old["kl"] is not None:
        non_score = (-kl_coef * old["kl"]).sum(1)
        m.mean("objective/kl", old["kl"].sum(1))
        m.mean("objective/non_score_reward", non_score)
    m.mean("objective/entropy", old["entropy"].sum(1))
    m.mean("objective/rlhf_reward", (old["scores"] + non_score)[scored])
    m.mean("objective/scores", old["scores"][scored])
    m.mean("objective/unscored", old["unscored"].float())
    m.total("val/num_eos_tokens", rollout.has_eos.float())
    m.mean("val/response_length", rollout.response_mask.sum(1).float())
    if rollout.trajectories is not None:  # multi-turn (a config choice: every rank has trajectories, or none)
        trajectories = rollout.trajectories
        m.mean("env/turns_mean", torch.tensor([float(t.turns) for t in trajectories]))
        m.total("env/tool_calls", torch.tensor([float(t.tool_calls) for t in trajectories]))
        m.total("env/tool_errors", torch.tensor([float(t.tool_errors) for t in trajectories]))
        m.mean("env/truncated", torch.tensor([float(t.truncated) for t in trajectories]))
        m.mean("env/reward", torch.tensor([float(sum(t.turn_rewards)) for t in trajectories]))
    for name, column in old["reward_columns"].items():
        m.mean(f"objective/scores/{name}", torch.tensor([float(v) for v in column if v is not None]))
    for name in stat_names:
        values = stats.get(name, [])
        if name == "train/skipped_steps":  # the number of skipped steps of the iteration (the same on every rank)
            m.rank_mean(name, [torch.stack(values).sum()] if values else [])
        else:
            m.rank_mean(name, values)
    if "dynamic_sampling" in old:
        generated, filtered, filled, rounds = old["dynamic_sampling"].unbind()
        m.ratio("dynamic_sampling/filtered_fraction", filtered, generated)
        m.rank_mean("dynamic_sampling/rounds", [rounds])
        m.total("dynamic_sampling/filled_groups", filled)
    ratios = stats.get("val/ratio", [])
    m.rank_mean("val/ratio_var", [torch.stack(ratios).var() if len(ratios) > 1 else torch.zeros(())] if ratios else [])
    return m.reduce(all_reduce_sum)
