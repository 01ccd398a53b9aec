"""`vlm-rl train-reward` on 2 gloo CPU ranks, or with gradient accumulation, follows the 1-rank learning-rate schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# accelerate's --cpu launcher starts a single process; the torchrun-based one (--multi_gpu) with use_cpu gives 2 CPU ranks.
LAUNCH_2_RANKS = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "-m", "reward_models.train_reward"]


@pytest.mark.slow
def test_two_ranks_and_accumulation_follow_the_one_rank_lr_schedule(tmp_path, tiny_model_dir, synthetic_data_dir):
    from reward_models.train_reward import main

    # 32 pairs in global batches of 4: 8 optimiser steps, 2 of them warm-up, then linear decay to 0.
    args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "preferences.jsonl"),
            "--eval_data", str(synthetic_data_dir / "preferences_test.jsonl"), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "linear", "--warmup_ratio", "0.25", "--num_train_epochs", "1", "--logging_steps", "1",
            "--use_cpu", "--seed", "0", "--torch_num_threads", "1"]
    one = main([*args, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])["log_history"]
    accumulated = main([*args, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                        "--output_dir", str(tmp_path / "accumulated")])["log_history"]
    env = {**os.environ, "VLM_RL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*LAUNCH_2_RANKS, *args, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())["log_history"]

    assert [h["step"] for h in one] == list(range(1, 9))
    assert [h["learning_rate"] for h in one] == pytest.approx([0, 5e-4, 1e-3, 5e-3 / 6, 4e-3 / 6, 3e-3 / 6, 2e-3 / 6, 1e-3 / 6])
    for run in (two, accumulated):
        assert [h["step"] for h in run] == [h["step"] for h in one]
        assert [h["learning_rate"] for h in run] == pytest.approx([h["learning_rate"] for h in one])
        # The same global batches (split over ranks or micro-batches), so the same losses up to rounding.
        assert [h["loss"] for h in run] == pytest.approx([h["loss"] for h in one], rel=1e-4)
