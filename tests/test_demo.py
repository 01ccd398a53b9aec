"""A shortened `vlm-rl demo`: every stage runs and the report files come out right."""

import json

import pytest
import yaml

from vlm_rl.demo import DemoConfig, run_demo, task_setting
from vlm_rl.errors import UserError


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


@pytest.mark.slow
def test_demo_trains_one_policy_per_estimator_from_the_same_sft_model(tmp_path):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), n=80, sft_steps=5, sft_batch_size=4, ppo_episodes=32, ppo_batch_size=16,
        ppo_mini_batches=2, ppo_epochs=1, compare_samples=8, estimators="gae:separate,grpo",
    )  # fmt: skip
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    assert set(summary["models"]) == {"sft", "gae-separate", "grpo"} and set(summary["differences"]) == {"gae-separate", "grpo"}
    configs = {name: yaml.safe_load((out / f"ppo-{name}" / "ppo_config.yaml").read_text()) for name in ("gae-separate", "grpo")}
    assert (configs["gae-separate"]["advantage_estimator"], configs["gae-separate"]["critic"]) == ("gae", "separate")
    assert (configs["grpo"]["advantage_estimator"], configs["grpo"]["num_generations"]) == ("grpo", 4)
    for config in configs.values():  # the same start, reward, data, budget and the demo's stabilisers
        assert config["model_name_or_path"] == str(out / "sft") and config["total_episodes"] == 32 and config["reward"] == ["exact_match"]
        assert (config["learning_rate"], config["kl_coef"], config["target_kl"]) == (cfg.ppo_learning_rate, cfg.kl_coef, cfg.target_kl)
    assert (out / "ppo-gae-separate" / "critic" / "value_head.safetensors").exists()
    assert not (out / "ppo-grpo" / "value_head.safetensors").exists()
    timings = json.loads((out / "demo.json").read_text())["timings_s"]
    assert {"ppo-gae-separate", "ppo-grpo"} <= set(timings)


def test_demo_refuses_an_unknown_variant_before_writing_anything(tmp_path):
    with pytest.raises(UserError, match="unknown variant 'gae:lora'"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), n=40, sft_steps=1, ppo_episodes=16, ppo_batch_size=16, estimators="gae,gae:lora"))
    assert not (tmp_path / "demo").exists()


def test_the_demo_steps_and_episodes_are_the_tasks_unless_given():
    tasks = ("colour", "motion", "colour,motion", "appear")
    assert [task_setting(DemoConfig(tasks=t), "sft_steps") for t in tasks] == [1200, 1500, 1500, 1200]
    assert [task_setting(DemoConfig(tasks=t), "ppo_episodes") for t in tasks] == [4800, 1600, 4800, 4800]
    assert task_setting(DemoConfig(tasks="motion", sft_steps=20), "sft_steps") == 20


@pytest.mark.slow
def test_short_video_demo_end_to_end(tmp_path):
    """`--tasks motion`: clips through make-data, SFT, PPO and compare; the report shows each clip as frames."""
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), tasks="motion", n=24, sft_steps=4, sft_batch_size=4, ppo_episodes=16, ppo_batch_size=8,
        ppo_mini_batches=2, ppo_epochs=1, compare_samples=4,
    )  # fmt: skip
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    assert (out / "data" / "clips").is_dir() and (out / "ppo" / "model.safetensors").exists()
    assert summary["models"]["sft"]["n"] == 4
    html = (out / "report" / "report.html").read_text()
    assert html.count('<img class="strip"') == 4 and "video: 8 frames" in html
