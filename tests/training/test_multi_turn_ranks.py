"""Multi-turn rollouts on 2 ranks whose samples take different numbers of turns (rank 0: 3 turns with a zoomed image
after each of the first two, rank 1: 1 turn), under FSDP2, where every forward of `generate` gathers shards from
both ranks: the ranks stay in step (the rank that has finished runs its turns on a copy), train, checkpoint, and a
run resumed from the first checkpoint replays the second iteration exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {
    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EOS_BIAS": "8",
    "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests" / "rollout")]),
}  # fmt: skip
FSDP2 = ["--config_file", "configs/accelerate/fsdp2.yaml", "tests/multiprocess/ppo_ranks.py"]


def launch(out: Path, model_dir, data_dir, *extra: str) -> list[dict]:
    """2 CPU ranks under FSDP2 (tests/multiprocess/ppo_ranks.py), 2 PPO iterations of 4 samples per rank; the log."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
           *FSDP2, "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out), "--report_to", "none",
           "--model_name_or_path", str(model_dir), "--train_data", str(data_dir / "train.jsonl"), "--reward", "trainer_helpers:completion_length",
           "--environment", "multi_turn_helpers:ZoomEveryTurn", "--max_turns", "4", "--max_total_tokens", "200",
           "--learning_rate", "1e-2", "--kl_coef", "0.5", "--max_new_tokens", "6", "--per_device_train_batch_size", "2",
           "--gradient_accumulation_steps", "2", "--num_mini_batches", "1", "--total_episodes", "16", "--save_steps", "1", *extra]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=150)  # a hang fails, not blocks
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_two_ranks_with_uneven_turns_stay_in_step_and_resume_exactly(tmp_path, tiny_model_dir, synthetic_data_dir):
    straight = launch(tmp_path / "straight", tiny_model_dir, synthetic_data_dir)
    steps = [h for h in straight if "env/turns_mean" in h]
    assert len(steps) == 2
    for h in steps:
        assert h["env/turns_mean"] == 2.0  # 4 samples of 3 turns on rank 0, 4 of 1 turn on rank 1
        assert h["env/truncated"] == 0.0 and h["env/reward"] == pytest.approx(0.5 * 2.0)
    rank = [json.loads((tmp_path / "straight" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rank[0]["checksum"] == rank[1]["checksum"]  # the same full weights on both ranks
    resumed = launch(tmp_path / "resumed", tiny_model_dir, synthetic_data_dir, "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-1"))
    want, got = steps[-1], [h for h in resumed if "env/turns_mean" in h][-1]
    for name, value in want.items():
        if name != "eps":
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
