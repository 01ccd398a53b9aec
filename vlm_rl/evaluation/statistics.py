"""Statistics for comparing checkpoints on the same prompts (pure functions, no torch).

The comparison generates one response per prompt from every model with the same seeds and
generation config, so the models' rewards are *paired* by prompt. Everything here works on
hand-made numbers:

- `bootstrap_ci`: percentile bootstrap confidence interval of a mean.
- `paired_difference`: the mean per-prompt difference ``b - a`` with a bootstrap CI that resamples
  prompts (pairs), which is much tighter than comparing two independent CIs.
- `win_tie_loss`: per-prompt counts of one model against another.
- `summarize`: the `summary.json` structure the report is built from.
- `read_training_curves`: the training curves of a run from its Trainer-convention
  ``trainer_state.json``.

All resampling is deterministic given ``seed`` (``numpy.random.default_rng``).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CURVE_METRICS",
    "TIE_TOLERANCE",
    "bootstrap_ci",
    "paired_difference",
    "read_training_curves",
    "summarize",
    "win_tie_loss",
]

#: Two rewards closer than this count as a tie.
TIE_TOLERANCE = 1e-9

#: The training metrics (TRL's PPO names) that `read_training_curves` returns, in report order.
CURVE_METRICS = (
    "objective/scores",
    "eval/scores",
    "eval/scores_greedy",
    "objective/rlhf_reward",
    "objective/kl",
    "eval/kl",
    "objective/entropy",
    "loss/value_avg",
    "loss/policy_avg",
)

# Bootstrap resampling is vectorised in chunks of at most this many drawn indices.
_BOOTSTRAP_CHUNK = 1 << 22


def _is_missing(x: Any) -> bool:
    """None and NaN are missing values (a reward function that failed on a sample)."""
    if x is None:
        return True
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    Draws ``n_resamples`` resamples of ``len(values)`` values with replacement, takes each one's
    mean, and returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of
    those means. Deterministic for a given ``seed``. A single value, or values that are all equal,
    give the zero-width interval ``(v, v)`` exactly.

    Raises ValueError on an empty input, a non-finite value, or a bad ``confidence`` /
    ``n_resamples``.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci got a non-finite value (drop missing values first)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if np.all(x == x[0]):
        v = float(x[0])
        return v, v

    rng = np.random.default_rng(seed)
    n = x.size
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        means[start : start + rows] = x[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.percentile(means, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    # The percentiles of resample means always lie within [min(x), max(x)]; clamp against
    # floating-point round-off so that the interval never leaves the data's range.
    lo = min(max(float(lo), float(x.min())), float(x.max()))
    hi = min(max(float(hi), float(x.min())), float(x.max()))
    return lo, hi


def paired_difference(
    a: Sequence[float | None],
    b: Sequence[float | None],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean of the per-prompt differences ``b[i] - a[i]`` and its bootstrap CI.

    ``a`` and ``b`` are aligned by prompt (same length, same order). Resampling draws prompts,
    i.e. whole pairs, so the prompt-to-prompt difficulty that both models share cancels out.
    Pairs where either value is missing (None or NaN) are dropped; ``n`` is the number of pairs
    used. With no usable pair, ``mean`` and the CI bounds are None.

    Returns ``{"mean": float | None, "ci95": [lo, hi], "n": int}`` (the key is ``ci95`` whatever
    ``confidence`` is, to keep one schema; `summarize` always uses 0.95).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs aligned sequences, got lengths {len(a)} and {len(b)}")
    diffs = [float(y) - float(x) for x, y in zip(a, b) if not _is_missing(x) and not _is_missing(y)]
    if not diffs:
        return {"mean": None, "ci95": [None, None], "n": 0}
    lo, hi = bootstrap_ci(diffs, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {"mean": float(np.mean(diffs)), "ci95": [lo, hi], "n": len(diffs)}


def win_tie_loss(
    first: Sequence[float | None], other: Sequence[float | None], tol: float = TIE_TOLERANCE
) -> dict[str, int]:
    """Per-prompt counts of ``other`` against ``first`` (aligned by prompt).

    ``win``: other's reward is higher than first's by more than ``tol``; ``loss``: lower by more
    than ``tol``; ``tie``: otherwise. Prompts where either reward is missing are not counted.
    """
    if len(first) != len(other):
        raise ValueError(f"win_tie_loss needs aligned sequences, got lengths {len(first)} and {len(other)}")
    counts = {"win": 0, "tie": 0, "loss": 0}
    for f, o in zip(first, other):
        if _is_missing(f) or _is_missing(o):
            continue
        d = float(o) - float(f)
        if d > tol:
            counts["win"] += 1
        elif d < -tol:
            counts["loss"] += 1
        else:
            counts["tie"] += 1
    return counts


def _format_ids(ids: Sequence[Any], limit: int = 20) -> str:
    ids = sorted(ids, key=lambda i: (str(type(i)), i))
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)} in all)"


def _index_by_prompt(name: str, records: Sequence[Mapping[str, Any]]) -> dict[Any, Mapping[str, Any]]:
    by_id: dict[Any, Mapping[str, Any]] = {}
    for i, rec in enumerate(records):
        if "prompt_id" not in rec:
            raise ValueError(f"model {name!r}: record {i} has no 'prompt_id'")
        pid = rec["prompt_id"]
        if pid in by_id:
            raise ValueError(f"model {name!r}: prompt_id {pid!r} appears more than once")
        by_id[pid] = rec
    return by_id


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(
    generations: Mapping[str, Sequence[Mapping[str, Any]]],
    model_names: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-model figures and paired differences against the first model.

    ``generations`` maps each model name to its per-prompt records
    ``{"prompt_id", "reward", "eos", "length", "kl_to_first"}``: ``reward`` the combined reward
    (None/NaN when unscored), ``eos`` whether the response ended with an eos token, ``length`` the
    response length in tokens, ``kl_to_first`` the mean per-token KL of this model's response to
    the first model (None when not computed). ``model_names[0]`` is the baseline. Every model must
    have the same set of prompt ids; records are paired by prompt id, not by position.

    Returns (JSON-serialisable; 95% percentile-bootstrap CIs)::

        {"models": {NAME: {"mean_reward", "ci95": [lo, hi], "eos_rate", "mean_length",
                           "kl_to_first", "win", "tie", "loss", "n", "n_unscored"}},
         "differences": {NAME: {"mean", "ci95": [lo, hi], "n"}}}

    - ``n``: the number of prompts; ``n_unscored``: how many of them have no reward (excluded
      from ``mean_reward``, its CI and win/tie/loss). ``mean_reward`` and the CI are None when
      no reward is left.
    - ``kl_to_first``: mean over the records that have one; 0.0 for the first model; None when
      no record has one.
    - ``win``/``tie``/``loss``: this model against the first, per prompt (both scored). The first
      model against itself is 0 / (scored prompts) / 0.
    - ``differences`` holds every model but the first: mean of ``reward[model] - reward[first]``
      over the prompts where both are scored, with a paired bootstrap CI; ``n`` the pairs used.
    """
    names = list(model_names)
    if not names:
        raise ValueError("summarize needs at least one model name")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    absent = [n for n in names if n not in generations]
    if absent:
        raise ValueError(f"no generations for model(s) {absent}; have {sorted(generations)}")

    indexed = {name: _index_by_prompt(name, generations[name]) for name in names}
    first = names[0]
    ids = list(indexed[first])
    if not ids:
        raise ValueError(f"model {first!r} has no generations")
    first_ids = set(ids)
    problems = []
    for name in names[1:]:
        have = set(indexed[name])
        missing = first_ids - have
        extra = have - first_ids
        if missing:
            problems.append(f"model {name!r} is missing prompt_ids {_format_ids(missing)} that {first!r} has")
        if extra:
            problems.append(f"model {name!r} has prompt_ids {_format_ids(extra)} that {first!r} lacks")
    if problems:
        raise ValueError("models were not run on the same prompts: " + "; ".join(problems))

    rewards: dict[str, list[float | None]] = {}
    for name in names:
        rewards[name] = [
            None if _is_missing(indexed[name][pid].get("reward")) else float(indexed[name][pid]["reward"])
            for pid in ids
        ]

    models: dict[str, dict[str, Any]] = {}
    differences: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        recs = [indexed[name][pid] for pid in ids]
        scored = [r for r in rewards[name] if r is not None]
        if scored:
            lo, hi = bootstrap_ci(scored, n_resamples=n_resamples, confidence=0.95, seed=seed)
            ci: list[float | None] = [lo, hi]
        else:
            ci = [None, None]
        if k == 0:
            kl: float | None = 0.0
            wtl = {"win": 0, "tie": len(scored), "loss": 0}
        else:
            kl = _mean_or_none([float(r["kl_to_first"]) for r in recs if not _is_missing(r.get("kl_to_first"))])
            wtl = win_tie_loss(rewards[first], rewards[name])
            differences[name] = paired_difference(
                rewards[first], rewards[name], n_resamples=n_resamples, confidence=0.95, seed=seed
            )
        models[name] = {
            "mean_reward": _mean_or_none(scored),
            "ci95": ci,
            "eos_rate": float(np.mean([bool(r.get("eos", False)) for r in recs])),
            "mean_length": float(np.mean([float(r.get("length", 0)) for r in recs])),
            "kl_to_first": kl,
            "win": wtl["win"],
            "tie": wtl["tie"],
            "loss": wtl["loss"],
            "n": len(recs),
            "n_unscored": len(recs) - len(scored),
        }
    return {"models": models, "differences": differences}


def _checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def _find_trainer_state(run_dir: Path) -> Path | None:
    direct = run_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    candidates = []
    for child in run_dir.glob("checkpoint-*"):
        step = _checkpoint_step(child)
        if step is not None and (child / "trainer_state.json").is_file():
            candidates.append((step, child / "trainer_state.json"))
    if not candidates:
        return None
    return max(candidates)[1]


def read_training_curves(
    run_dir: str | Path | None, metrics: Sequence[str] = CURVE_METRICS
) -> dict[str, list[tuple[int, float]]]:
    """Training curves of a run: ``{metric: [(step, value), ...]}`` sorted by step.

    Reads ``run_dir/trainer_state.json`` if present, else the one in the newest
    ``run_dir/checkpoint-N/`` (largest N). Returns the ``log_history`` series of ``metrics``
    (default: `CURVE_METRICS`) that occur, skipping non-numeric and non-finite values. A
    missing directory or file (e.g. an SFT model with no PPO logs) gives ``{}``; so does an
    unreadable file, with a warning.
    """
    if run_dir is None:
        return {}
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    path = _find_trainer_state(run_dir)
    if path is None:
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        history = state.get("log_history", []) if isinstance(state, dict) else []
    except (OSError, ValueError) as e:
        warnings.warn(f"could not read training logs {path}: {e}", stacklevel=2)
        return {}

    curves: dict[str, list[tuple[int, float]]] = {}
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            continue
        step = entry.get("step", i)
        for metric in metrics:
            value = entry.get(metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            curves.setdefault(metric, []).append((int(step), float(value)))
    return {m: sorted(curves[m], key=lambda sv: sv[0]) for m in metrics if m in curves}
