"""The tiny reward model reaches >= 90% held-out pairwise accuracy on synthetic preferences (the documented recipe)."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reward_model_from_sft_reaches_90_percent(tmp_path, tiny_model_dir):
    from reward_models.train_reward import main as train_reward
    from vlm_rl.sft import parse_args, run_sft
    from vlm_rl.data.synthetic import make_synthetic_data

    data = make_synthetic_data(tmp_path / "colour", n=1000, seed=0, noise=0.3, tasks=["colour"])
    sft = run_sft(parse_args(["--config", str(REPO / "configs/sft_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
                              "--train_data", str(data / "train.jsonl"), "--output_dir", str(tmp_path / "sft"),
                              "--disable_tqdm", "true"]))
    train_reward(["--config", str(REPO / "configs/reward_tiny.yaml"), "--model_name_or_path", str(sft),
                  "--train_data", str(data / "preferences.jsonl"), "--eval_data", str(data / "preferences_test.jsonl"),
                  "--output_dir", str(tmp_path / "rm")])
    results = json.loads((tmp_path / "rm" / "eval_results.json").read_text())
    assert results["eval_pairs"] == 200
    assert results["eval_accuracy"] >= 0.9, results
