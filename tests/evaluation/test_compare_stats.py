"""Statistics of the checkpoint comparison, checked on hand-made numbers."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from vlm_rl.evaluation.statistics import (
    CURVE_METRICS,
    bootstrap_ci,
    paired_difference,
    read_training_curves,
    summarize,
    win_tie_loss,
)


# ------------------------------------------------------------------------------- bootstrap_ci


def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(0.5, 1.0, size=20).tolist()
    large = rng.normal(0.5, 1.0, size=2000).tolist()
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < np.mean(small) < hi_s
    assert lo_l < np.mean(large) < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~ 1/sqrt(100) as wide
    # A 95% interval for the mean of N(0.5, 1) with n=2000 has half-width ~0.044.
    assert 0.06 < hi_l - lo_l < 0.12


def test_bootstrap_ci_is_deterministic_and_seeded():
    values = np.random.default_rng(0).normal(size=30).tolist()
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_ci_wider_with_higher_confidence():
    values = np.random.default_rng(0).normal(size=50).tolist()
    lo90, hi90 = bootstrap_ci(values, confidence=0.90)
    lo99, hi99 = bootstrap_ci(values, confidence=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_bootstrap_ci_constant_and_single_values_give_zero_width():
    assert bootstrap_ci([0.1] * 37) == (0.1, 0.1)
    assert bootstrap_ci([2.5]) == (2.5, 2.5)


def test_bootstrap_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)


# --------------------------------------------------------------------- paired / win-tie-loss


def test_paired_difference_constant_shift():
    a = [0.1, 0.7, -0.3, 0.25, 0.9]
    b = [x + 1 for x in a]
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(1.0)
    assert d["ci95"][0] == pytest.approx(1.0)
    assert d["ci95"][1] == pytest.approx(1.0)
    assert d["n"] == 5


def test_paired_difference_is_paired_not_independent():
    # Prompts vary a lot in difficulty, b is a little better on every prompt: the paired CI
    # excludes 0 although the two models' own CIs overlap heavily.
    rng = np.random.default_rng(0)
    a = rng.normal(0, 5, size=40)
    b = a + 0.2 + rng.normal(0, 0.05, size=40)
    d = paired_difference(a.tolist(), b.tolist())
    assert d["ci95"][0] > 0
    assert d["mean"] == pytest.approx(float(np.mean(b - a)))
    lo_a, hi_a = bootstrap_ci(a.tolist())
    lo_b, hi_b = bootstrap_ci(b.tolist())
    assert lo_b < hi_a


def test_paired_difference_drops_missing_pairs():
    d = paired_difference([1.0, None, 2.0, 3.0], [2.0, 5.0, float("nan"), 3.0])
    assert d["n"] == 2
    assert d["mean"] == pytest.approx(0.5)
    assert paired_difference([None], [1.0]) == {"mean": None, "ci95": [None, None], "n": 0}
    with pytest.raises(ValueError, match="aligned"):
        paired_difference([1.0], [1.0, 2.0])


def test_win_tie_loss_by_hand():
    first = [0.0, 1.0, 0.5, 0.5, 0.2, None]
    other = [1.0, 0.0, 0.5, 0.5 + 1e-12, 0.3, 1.0]
    # win (0 -> 1), loss (1 -> 0), tie, tie (within 1e-9), win, skipped (unscored)
    assert win_tie_loss(first, other) == {"win": 2, "tie": 2, "loss": 1}
    assert win_tie_loss(other, first) == {"win": 1, "tie": 2, "loss": 2}


# -------------------------------------------------------------------------------- summarize


def _rec(pid, reward, eos, length, kl):
    return {"prompt_id": pid, "reward": reward, "eos": eos, "length": length, "kl_to_first": kl}


def _two_models():
    sft = [
        _rec(0, 0.0, True, 10, None),
        _rec(1, 1.0, True, 20, None),
        _rec(2, 0.5, False, 30, None),
        _rec(3, 0.0, True, 40, None),
    ]
    # Deliberately in another order: records are paired by prompt_id, not by position.
    rl = [
        _rec(3, 0.0, True, 4, 0.3),
        _rec(2, 1.0, True, 6, 0.2),
        _rec(1, 0.5, True, 8, None),
        _rec(0, 1.0, False, 2, 0.1),
    ]
    return {"sft": sft, "rl": rl}


def test_summarize_hand_made_two_models():
    s = summarize(_two_models(), ["sft", "rl"])
    assert set(s) == {"models", "differences"}
    assert list(s["models"]) == ["sft", "rl"]
    assert list(s["differences"]) == ["rl"]

    sft, rl = s["models"]["sft"], s["models"]["rl"]
    assert sft["n"] == rl["n"] == 4
    assert sft["n_unscored"] == rl["n_unscored"] == 0
    assert sft["mean_reward"] == pytest.approx(0.375)
    assert rl["mean_reward"] == pytest.approx(0.625)
    assert sft["eos_rate"] == pytest.approx(0.75)
    assert rl["eos_rate"] == pytest.approx(0.75)
    assert sft["mean_length"] == pytest.approx(25.0)
    assert rl["mean_length"] == pytest.approx(5.0)
    assert sft["kl_to_first"] == 0.0
    assert rl["kl_to_first"] == pytest.approx(0.2)  # mean of 0.1, 0.2, 0.3; None skipped
    assert (sft["win"], sft["tie"], sft["loss"]) == (0, 4, 0)
    # per prompt rl vs sft: 0: 1 > 0 win; 1: 0.5 < 1 loss; 2: 1 > 0.5 win; 3: 0 == 0 tie
    assert (rl["win"], rl["tie"], rl["loss"]) == (2, 1, 1)
    for m in (sft, rl):
        lo, hi = m["ci95"]
        assert lo <= m["mean_reward"] <= hi

    d = s["differences"]["rl"]
    # differences rl - sft by prompt: +1, -0.5, +0.5, 0 -> mean 0.25
    assert d["mean"] == pytest.approx(0.25)
    assert -0.5 <= d["ci95"][0] <= 0.25 <= d["ci95"][1] <= 1.0
    json.dumps(s, allow_nan=False)  # plain JSON


def test_summarize_is_deterministic():
    assert summarize(_two_models(), ["sft", "rl"]) == summarize(_two_models(), ["sft", "rl"])


def test_summarize_constant_shift_gives_exact_ci():
    a = [_rec(i, 0.1 * i, True, 5, None) for i in range(6)]
    b = [_rec(i, 0.1 * i + 1, True, 5, 0.0) for i in range(6)]
    d = summarize({"a": a, "b": b}, ["a", "b"])["differences"]["b"]
    assert d["mean"] == pytest.approx(1.0)
    assert d["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_summarize_unscored_rewards_are_excluded_and_counted():
    gens = _two_models()
    gens["rl"][0]["reward"] = None  # prompt 3
    gens["rl"][1]["reward"] = float("nan")  # prompt 2
    s = summarize(gens, ["sft", "rl"])
    rl = s["models"]["rl"]
    assert rl["n"] == 4 and rl["n_unscored"] == 2
    assert rl["mean_reward"] == pytest.approx(0.75)  # 0.5 and 1.0
    assert (rl["win"], rl["tie"], rl["loss"]) == (1, 0, 1)
    assert s["differences"]["rl"]["mean"] == pytest.approx(0.25)  # +1 and -0.5
    assert s["differences"]["rl"]["n"] == 2

    for r in gens["rl"]:
        r["reward"] = None
    rl = summarize(gens, ["sft", "rl"])["models"]["rl"]
    assert rl["mean_reward"] is None and rl["ci95"] == [None, None]


def test_summarize_mismatched_prompt_ids_raise_naming_them():
    gens = _two_models()
    gens["rl"] = [r for r in gens["rl"] if r["prompt_id"] != 2] + [_rec(7, 0.0, True, 1, 0.0)]
    with pytest.raises(ValueError) as e:
        summarize(gens, ["sft", "rl"])
    msg = str(e.value)
    assert "'rl' is missing prompt_ids [2]" in msg
    assert "[7]" in msg


def test_summarize_other_input_errors():
    gens = _two_models()
    with pytest.raises(ValueError, match="no generations for model"):
        summarize(gens, ["sft", "ppo"])
    gens["rl"].append(_rec(0, 0.0, True, 1, 0.0))
    with pytest.raises(ValueError, match="more than once"):
        summarize(gens, ["sft", "rl"])


def test_summarize_three_models_first_is_baseline():
    gens = _two_models()
    gens["rl2"] = [dict(r, reward=r["reward"] + 1.0) for r in gens["sft"]]
    s = summarize(gens, ["rl", "sft", "rl2"])
    assert list(s["differences"]) == ["sft", "rl2"]
    assert s["models"]["rl"]["kl_to_first"] == 0.0
    assert s["differences"]["rl2"]["mean"] == pytest.approx(1.375 - 0.625)


# ------------------------------------------------------------------------ read_training_curves


def _state(path, steps, scale=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    history = [
        {"step": s, "objective/scores": scale * s, "objective/kl": 0.01 * s, "episode": 8 * s, "lr": 1e-5}
        for s in steps
    ]
    history.append({"step": steps[-1], "train_runtime": 1.0, "objective/entropy": float("nan")})
    path.write_text(json.dumps({"global_step": steps[-1], "log_history": history}))


def test_read_training_curves_newest_checkpoint(tmp_path):
    _state(tmp_path / "checkpoint-2" / "trainer_state.json", [1, 2], scale=1.0)
    _state(tmp_path / "checkpoint-10" / "trainer_state.json", [1, 2, 5, 10], scale=2.0)  # 10 > 2 numerically
    _state(tmp_path / "checkpoint-9" / "trainer_state.json", [1, 9], scale=3.0)
    (tmp_path / "checkpoint-99-tmp").mkdir()  # not a checkpoint
    curves = read_training_curves(tmp_path)
    assert set(curves) == {"objective/scores", "objective/kl"}  # lr/episode not asked; NaN entropy skipped
    assert curves["objective/scores"] == [(1, 2.0), (2, 4.0), (5, 10.0), (10, 20.0)]
    assert curves["objective/kl"][-1] == (10, pytest.approx(0.1))


def test_read_training_curves_prefers_top_level_state(tmp_path):
    _state(tmp_path / "checkpoint-10" / "trainer_state.json", [1, 10], scale=2.0)
    _state(tmp_path / "trainer_state.json", [1, 2, 3], scale=5.0)
    assert read_training_curves(tmp_path)["objective/scores"] == [(1, 5.0), (2, 10.0), (3, 15.0)]


def test_read_training_curves_all_metrics_and_missing(tmp_path):
    entry = {m: 0.5 for m in CURVE_METRICS}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [dict(entry, step=3)]}))
    assert set(read_training_curves(tmp_path)) == set(CURVE_METRICS)
    assert read_training_curves(tmp_path / "nope") == {}
    (tmp_path / "empty").mkdir()
    assert read_training_curves(tmp_path / "empty") == {}
    assert read_training_curves(None) == {}


def test_bootstrap_ci_tails_are_the_2_5_and_97_5_percentiles():
    # 200 ones and 200 zeros: the resample mean is ~ Normal(0.5, 0.025), so the 95% interval is 0.5 -/+ 1.96 x 0.025.
    # With 20,000 resamples each bound is within ~0.0005 of that; a 90% interval (alpha instead of alpha / 2) would
    # sit 0.008 inside it.
    lo, hi = bootstrap_ci([1.0] * 200 + [0.0] * 200, n_resamples=20_000)
    assert lo == pytest.approx(0.5 - 1.96 * 0.025, abs=0.002) and hi == pytest.approx(0.5 + 1.96 * 0.025, abs=0.002)
    lo90, hi90 = bootstrap_ci([1.0] * 200 + [0.0] * 200, n_resamples=20_000, confidence=0.90)
    assert lo90 == pytest.approx(0.5 - 1.645 * 0.025, abs=0.002) and hi90 == pytest.approx(0.5 + 1.645 * 0.025, abs=0.002)


def test_bootstrap_ci_follows_a_skewed_distribution():
    # 10 ones in 400: the resample mean is Binomial(400, 0.025) / 400, skewed right; a percentile interval follows
    # that skew (a mean +/- z x sd interval would be symmetric, and its low end below 10 / 400 - 6 / 400).
    x = [1.0] * 10 + [0.0] * 390
    lo, hi = bootstrap_ci(x, n_resamples=20_000)
    mean = 10 / 400
    assert hi - mean > mean - lo  # the upper tail is the longer
    binomial = [math.comb(400, k) * 0.025**k * 0.975 ** (400 - k) for k in range(401)]
    cdf = list(itertools.accumulate(binomial))
    k_lo = next(k for k, c in enumerate(cdf) if c >= 0.025)
    k_hi = next(k for k, c in enumerate(cdf) if c >= 0.975)
    assert abs(lo - k_lo / 400) <= 1 / 400 and abs(hi - k_hi / 400) <= 1 / 400
