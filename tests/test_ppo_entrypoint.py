"""`accelerate launch scripts/ppo.py --config configs/ppo_tiny.yaml`, single- and multi-process, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(cmd, tmp_path, timeout=600):
    env = {**os.environ, "VLM_RL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tiny_config_trains_logs_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "ppo"
    run([*ACCELERATE, "--num_processes", "1", "scripts/ppo.py", "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out)], tmp_path)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert len(history) == 10
    for name in ["objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
                 "val/ratio", "val/num_eos_tokens", "eps", "episode", "lr"]:
        assert name in history[-1], name
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # report_to: tensorboard
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    # resume from the last checkpoint and go on for 5 more iterations
    run([*ACCELERATE, "--num_processes", "1", "scripts/ppo.py", "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out),
         "--resume_from_checkpoint", "True", "--total_episodes", "480"], tmp_path)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history] == list(range(1, 16))


@pytest.mark.slow
def test_two_processes_sample_different_prompts_and_stay_in_sync(tmp_path, tiny_model_dir, synthetic_data_dir):
    out = tmp_path / "ppo2"
    # accelerate's --cpu launcher starts a single process; the torchrun-based one (--multi_gpu) with use_cpu gives 2 CPU ranks.
    run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "tests/multiprocess/ppo_ranks.py",
         "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out), "--report_to", "none",
         "--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_mini_batches", "1",
         "--total_episodes", "16", "--save_steps", "0"], tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["sources"]) & set(ranks[1]["sources"])  # each rank rolls out its own prompts
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were all-reduced: identical weights
    assert len(json.loads((out / "trainer_state.json").read_text())["log_history"]) == 2  # 16 episodes / (2 x 4)


def test_repeated_reward_flags_are_all_kept():
    from vlm_rl.ppo import merge_repeated_flag

    argv = ["--reward", "exact_match:1.0", "--output_dir", "x", "--reward", "length:0.5", "rm_dir:0.2"]
    assert merge_repeated_flag(argv, "--reward") == ["--output_dir", "x", "--reward", "exact_match:1.0", "length:0.5", "rm_dir:0.2"]
    assert merge_repeated_flag(["--output_dir", "x"], "--reward") == ["--output_dir", "x"]
