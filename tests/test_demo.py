"""A shortened `vlm-rl demo`: every stage runs and the report files come out right."""

import json

import pytest

from vlm_rl.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), n=80, sft_steps=10, sft_batch_size=4, ppo_episodes=64, ppo_batch_size=16,
        ppo_mini_batches=2, ppo_epochs=1, compare_samples=16,
    )
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    for path in ["model/config.json", "data/train.jsonl", "sft/config.json", "ppo/model.safetensors",
                 "ppo/value_head.safetensors", "ppo/trainer_state.json", "report/report.html", "report/summary.json", "demo.json"]:
        assert (out / path).exists(), path
    assert set(summary["models"]) == {"sft", "rl"} and set(summary["differences"]) == {"rl"}
    assert summary["models"]["sft"]["n"] == 16
    assert json.loads((out / "report" / "summary.json").read_text()) == summary
    html = (out / "report" / "report.html").read_text()
    assert html.count("<svg") >= 4  # the PPO training curves
    assert "objective/scores" in html and "data:image/png;base64," in html
    timings = json.loads((out / "demo.json").read_text())["timings_s"]
    assert set(timings) == {"make-tiny-model", "make-data", "sft", "ppo", "compare"}
