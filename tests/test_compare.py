"""`vlm-rl compare`: the figures from hand-made generations, and the command end to end."""

import json

import pytest

from reward_models.base import load_rewards
from vlm_rl.compare import parse_named, run_compare, score_generations
from vlm_rl.compare_stats import summarize
from vlm_rl.data import load_samples


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return list(load_samples(synthetic_data_dir / "test.jsonl"))[:4]


def test_figures_from_hand_made_generations(samples):
    reward = load_rewards(["exact_match"])
    answers = [s["answer"] for s in samples]
    # baseline right on prompts 0 and 1; "rl" right on 0, 1, 2 and wrong on 3; "worse" right on 0 only
    made = {
        "base": ([answers[0], answers[1], "nope", "nope"], [True, True, False, True], [2, 2, 5, 3], [0.0] * 4),
        "rl": ([answers[0], f"The {answers[1].upper()}.", answers[2], "nope"], [True] * 4, [2, 3, 2, 2], [0.1, 0.2, 0.3, 0.4]),
        "worse": ([answers[0], "nope", "nope", "nope"], [False] * 4, [8, 8, 8, 8], [1.0, 1.0, 1.0, 1.0]),
    }
    records = {name: score_generations(reward, samples, *m)[0] for name, m in made.items()}
    assert [r["reward"] for r in records["rl"]] == [1.0, 1.0, 1.0, 0.0]  # exact match normalises case, article, punctuation
    summary = summarize(records, list(made))
    base, rl, worse = (summary["models"][n] for n in made)
    assert base["mean_reward"] == 0.5 and rl["mean_reward"] == 0.75 and worse["mean_reward"] == 0.25
    assert base["eos_rate"] == 0.75 and rl["eos_rate"] == 1.0 and worse["eos_rate"] == 0.0
    assert base["mean_length"] == 3.0 and rl["mean_length"] == 2.25
    assert rl["kl_to_first"] == pytest.approx(0.25) and base["kl_to_first"] == 0.0
    assert (rl["win"], rl["tie"], rl["loss"]) == (1, 3, 0)
    assert (worse["win"], worse["tie"], worse["loss"]) == (0, 3, 1)
    assert summary["differences"]["rl"]["mean"] == pytest.approx(0.25)
    assert summary["differences"]["worse"]["mean"] == pytest.approx(-0.25)
    lo, hi = summary["differences"]["rl"]["ci95"]
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0


def test_named_arguments_are_checked():
    assert parse_named(["a=/x", "b=/y"], "--model") == {"a": "/x", "b": "/y"}
    with pytest.raises(SystemExit, match="NAME=PATH"):
        parse_named(["/x"], "--model")
    with pytest.raises(SystemExit, match="used twice"):
        parse_named(["a=/x", "a=/y"], "--model")


def test_same_model_twice_ties_everywhere(tmp_path, tiny_model_dir, synthetic_data_dir):
    # Same weights, same prompts, same seeds, same generation config: identical generations.
    summary = run_compare(
        {"a": str(tiny_model_dir), "b": str(tiny_model_dir)},
        str(synthetic_data_dir / "test.jsonl"),
        ["exact_match", "length:0.5"],
        str(tmp_path / "report"),
        max_new_tokens=4,
        batch_size=3,
    )
    b = summary["models"]["b"]
    assert (b["win"], b["loss"]) == (0, 0) and b["kl_to_first"] == pytest.approx(0.0, abs=1e-6)
    assert summary["differences"]["b"]["mean"] == 0.0
    assert json.loads((tmp_path / "report" / "summary.json").read_text()) == summary
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "exact_match, length:0.5" in html
