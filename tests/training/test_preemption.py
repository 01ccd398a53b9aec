"""Signals and hard kills: the first SIGTERM asks for a checkpoint, the second exits at once, and a run killed
with SIGKILL at any moment resumes to the same numbers as a run never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_rl.training.preemption import resume_command

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

TWO_SIGNALS = """
import os, signal, time
from vlm_rl.training.preemption import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
    print("asked to stop", flush=True)
    os.kill(os.getpid(), signal.{second})
    time.sleep(10)
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])  # SIGINT: Ctrl-C after a cluster's SIGTERM
def test_the_first_signal_asks_to_stop_and_the_second_exits_at_once(second):
    result = subprocess.run([sys.executable, "-c", TWO_SIGNALS.format(second=second)], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == -getattr(signal, second)
    assert result.stdout == "asked to stop\n"
    assert "SIGTERM received: finishing this PPO iteration" in result.stderr
    assert "KeyboardInterrupt" not in result.stderr


def test_resume_command_replaces_any_resume_flag():
    argv = ["scripts/ppo.py", "--config", "c.yaml", "--resume_from_checkpoint", "old", "--kl_coef=0.1", "--resume_from_checkpoint=x"]
    assert resume_command("run/checkpoint-7", argv) == "python scripts/ppo.py --config c.yaml --kl_coef=0.1 --resume_from_checkpoint run/checkpoint-7"
    assert resume_command("ck", ["scripts/ppo.py"], launcher="accelerate launch").startswith("accelerate launch scripts/ppo.py")


def ppo(output_dir: Path, tiny_model_dir, synthetic_data_dir, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vlm_rl.cli", "ppo", "--config", "configs/ppo_tiny.yaml", "--output_dir", str(output_dir),
        "--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
        "--report_to", "none", "--save_steps", "1", "--save_total_limit", "3", "--total_episodes", "320", *extra,
    ]  # fmt: skip


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_metrics(tmp_path, tiny_model_dir, synthetic_data_dir):
    def start(output_dir: Path) -> subprocess.Popen:
        return subprocess.Popen(ppo(output_dir, tiny_model_dir, synthetic_data_dir), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(path: Path, process: subprocess.Popen) -> float:
        while not path.exists() and process.poll() is None:
            time.sleep(0.01)
        return time.time()

    process = start(tmp_path / "straight")
    first = wait_for(tmp_path / "straight" / "checkpoint-1", process)
    last = wait_for(tmp_path / "straight" / "checkpoint-10", process)
    assert process.wait(timeout=600) == 0
    straight = history(tmp_path / "straight")

    # A random moment of iterations 2-9: after checkpoint-k appears (k in 1..8), up to one iteration later.
    rng = random.Random(os.getpid())
    killed = tmp_path / "killed"
    process = start(killed)
    wait_for(killed / f"checkpoint-{rng.randint(1, 8)}", process)
    time.sleep(rng.uniform(0.0, (last - first) / 9))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    left = [p.name for p in killed.glob("checkpoint-*")]
    assert "checkpoint-10" not in left, left  # killed mid-training: there is something left to resume
    subprocess.run(ppo(killed, tiny_model_dir, synthetic_data_dir, "--resume_from_checkpoint", "latest"), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)

    resumed = history(killed)
    assert [h["step"] for h in resumed] == [h["step"] for h in straight]
    for want, got in zip(straight, resumed):
        for name, value in want.items():
            if name != "eps":
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (want["step"], name)
