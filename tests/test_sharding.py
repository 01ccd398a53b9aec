"""PPO under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks (DS_ACCELERATOR=cpu): the same numbers as DDP, full
Hugging Face weights in every checkpoint, and exact resume. Needs `pip install --no-build-isolation deepspeed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]


def ppo(engine: list[str], out: Path, model_dir, data_dir, *extra: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "tests")}
    cmd = [*LAUNCH, *engine, "scripts/ppo.py", "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out), "--report_to", "none",
           "--model_name_or_path", str(model_dir), "--train_data", str(data_dir / "train.jsonl"),
           "--reward", "trainer_helpers:completion_length", "--learning_rate", "1e-2", "--kl_coef", "0.5", "--max_new_tokens", "6",
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--num_mini_batches", "1",
           "--total_episodes", "24", "--save_steps", "1", "--save_total_limit", "5", *extra]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(Qwen2VLForConditionalGeneration.from_pretrained(path).named_parameters())


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir, synthetic_data_dir):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, ppo(["--multi_gpu"], out, tiny_model_dir, synthetic_data_dir, "--use_cpu", "true")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_trains_like_ddp_saves_full_weights_and_resumes_exactly(stage, ddp, tmp_path, tiny_model_dir, synthetic_data_dir):
    engine = ["--config_file", f"configs/accelerate/{stage}.yaml"]
    straight = ppo(engine, tmp_path / "straight", tiny_model_dir, synthetic_data_dir)
    ddp_dir, ddp_history = ddp
    for want, got in zip(ddp_history, straight, strict=True):  # the same rollouts, losses and gradient norms
        for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "train/grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), (stage, want["step"], name)
    reference, start, final = weights(ddp_dir), weights(tiny_model_dir), weights(tmp_path / "straight")  # full weights
    assert max((reference[n] - start[n]).abs().max() for n in start) > 1e-3  # the weights moved
    assert max((final[n] - reference[n]).abs().max() for n in start) < 1e-4
    weights(tmp_path / "straight" / "checkpoint-1")  # every checkpoint holds loadable full weights

    resumed = ppo(engine, tmp_path / "resumed", tiny_model_dir, synthetic_data_dir, "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-1"))
    for want, got in zip(straight, resumed, strict=True):
        for name, value in want.items():
            if name != "eps":
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (stage, want["step"], name)
    again = weights(tmp_path / "resumed")
    assert max((again[n] - final[n]).abs().max() for n in final) < 1e-6
