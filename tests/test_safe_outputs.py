"""train-reward, SFT and the demo never destroy an output directory they did not write: refused up front (exit 2,
before any model loads) unless told to overwrite; with the flag the old run is replaced and the full resolved
config is written beside the new one."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_helpers import user_error


@pytest.fixture()
def occupied(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return out


def test_train_reward_refuses_a_non_empty_output_dir_before_loading(occupied, tiny_model_dir, synthetic_data_dir, monkeypatch, capsys):
    from reward_models.vlm_reward import VLMRewardModel

    monkeypatch.setattr(VLMRewardModel, "from_base", classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    err = user_error(capsys, ["train-reward", "--model_name_or_path", str(tiny_model_dir),
                           "--train_data", str(synthetic_data_dir / "preferences.jsonl"), "--output_dir", str(occupied)])
    assert err.startswith("vlm-rl train-reward: error: ") and str(occupied) in err and "--overwrite" in err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (occupied / "notes.txt").read_text() == "keep me"


def test_train_reward_overwrite_replaces_and_writes_its_config(occupied, tiny_model_dir, synthetic_data_dir):
    from reward_models.train_reward import main

    pairs = synthetic_data_dir / "preferences.jsonl"
    main(["--model_name_or_path", str(tiny_model_dir), "--train_data", str(pairs), "--output_dir", str(occupied),
          "--overwrite", "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--eval_each_epoch", "false"])
    assert not (occupied / "notes.txt").exists() and (occupied / "reward_config.json").is_file()
    config = yaml.safe_load((occupied / "train_reward_config.yaml").read_text())
    assert config["model_name_or_path"] == str(tiny_model_dir) and config["train_data"] == str(pairs)
    assert config["overwrite_output_dir"] is True and config["max_steps"] == 1 and config["num_processes"] == 1
    assert not [p for p in occupied.parent.iterdir() if p.name.startswith(".")]


def test_sft_refuses_a_non_empty_output_dir_before_loading(occupied, tiny_model_dir, synthetic_data_dir, monkeypatch, capsys):
    monkeypatch.setattr("vlm_rl.sft._load_model", lambda config: pytest.fail("the model was loaded"))
    err = user_error(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
                           "--output_dir", str(occupied), "--use_cpu", "true"])
    assert err.startswith("vlm-rl sft: error: ") and str(occupied) in err
    assert "--overwrite_output_dir" in err and "--resume_from_checkpoint" in err
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_sft_overwrite_replaces_the_old_run_and_writes_its_config(occupied, tiny_model_dir, synthetic_data_dir):
    from vlm_rl.sft import main

    out = main(["--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
                "--output_dir", str(occupied), "--overwrite", "--max_steps", "1", "--per_device_train_batch_size", "2",
                "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])
    assert out == occupied and not (occupied / "notes.txt").exists()
    assert (occupied / "config.json").is_file() and json.loads((occupied / "sft_metrics.json").read_text())
    config = yaml.safe_load((occupied / "sft_config.yaml").read_text())
    assert config["model_name_or_path"] == str(tiny_model_dir) and config["max_steps"] == 1 and config["overwrite_output_dir"]
    assert not [p for p in occupied.parent.iterdir() if p.name.startswith(".")]  # the old run, moved aside, is gone


def test_demo_refuses_a_non_empty_output_folder(occupied, capsys):
    err = user_error(capsys, ["demo", "--out", str(occupied)])
    assert err.startswith("vlm-rl demo: error: ") and "--overwrite" in err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
