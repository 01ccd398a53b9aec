"""PPO under DeepSpeed ZeRO-2/ZeRO-3 (DS_ACCELERATOR=cpu) and FSDP2 on 2 CPU ranks: the same numbers as DDP, the
frozen models sharded like the policy, full Hugging Face weights in every checkpoint, and exact resume. Needs
`pip install --no-build-isolation deepspeed`. accelerate enables FSDP on GPUs only: the FSDP2 runs go through
tests/multiprocess/fsdp_on_cpu.py, which lets it on CPU ranks and then runs the PPO entry point unchanged."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

from reward_models.vlm_reward import VLMRewardModel
from vlm_rl.training.config import ConfigError
from vlm_rl.models.sharding import check_engine

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

REPO = Path(__file__).resolve().parents[2]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
ENGINES = {
    "zero2": ["--config_file", "configs/accelerate/zero2.yaml", "scripts/ppo.py"],
    "zero3": ["--config_file", "configs/accelerate/zero3.yaml", "scripts/ppo.py"],
    "fsdp2": ["--config_file", "configs/accelerate/fsdp2.yaml", "tests/multiprocess/fsdp_on_cpu.py"],
}
SHARDED = {"zero2": False, "zero3": True, "fsdp2": True}  # whether the weights (policy, reference, reward model) are split


def launch(engine: list[str], out: Path, model_dir, data_dir, *extra: str, precision: str = "no") -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 CPU ranks (this checkout's code) of 3 PPO iterations (unless `extra` says otherwise)."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", precision, "--dynamo_backend", "no"]
    cmd = [*accelerate, *engine, "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out), "--report_to", "none",
           "--model_name_or_path", str(model_dir), "--train_data", str(data_dir / "train.jsonl"),
           "--learning_rate", "1e-2", "--kl_coef", "0.5", "--max_new_tokens", "6",
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--num_mini_batches", "1",
           "--total_episodes", "24", "--save_steps", "1", "--save_total_limit", "5", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)


def ppo(engine: list[str], out: Path, model_dir, data_dir, reward_model: Path, *extra: str) -> tuple[list[dict], str]:
    """(log history, console output) of a 3-iteration run rewarded by response length and a learned reward model,
    with a separate critic (its own backbone: sharded, saved and resumed like the policy)."""
    result = launch(engine, out, model_dir, data_dir, "--reward", "trainer_helpers:completion_length", f"{reward_model}:0.5", "--critic", "separate", *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())["log_history"], result.stdout + result.stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The policy's full weights in `path` (loaded with `from_pretrained`) and a separate critic's (backbone and
    value head, as saved in `path/critic/`), by name."""
    policy = dict(Qwen2VLForConditionalGeneration.from_pretrained(path).named_parameters())
    files = [path / "critic" / f for f in ("model.safetensors", "value_head.safetensors") if (path / "critic").is_dir()]
    return {**policy, **{f"critic/{k}": v for f in files for k, v in load_file(f).items()}}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    torch.manual_seed(0)
    model = VLMRewardModel.from_base(str(tiny_model_dir), name="rm")
    torch.nn.init.normal_(model.head.weight, std=1.0)  # scores that differ between responses
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir, synthetic_data_dir, reward_model):
    out = tmp_path_factory.mktemp("ddp") / "run"
    history, _ = ppo(["--multi_gpu", "scripts/ppo.py"], out, tiny_model_dir, synthetic_data_dir, reward_model, "--use_cpu", "true")
    return out, history


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
@pytest.mark.slow
@needs_deepspeed
def test_sharded_ppo_trains_like_ddp_saves_full_weights_and_resumes_exactly(engine, ddp, tmp_path, tiny_model_dir, synthetic_data_dir, reward_model):
    straight, console = ppo(ENGINES[engine], tmp_path / "straight", tiny_model_dir, synthetic_data_dir, reward_model)
    placement = "sharded" if SHARDED[engine] else "whole on each rank"
    assert f"policy {placement}, reference {placement}, reward model 'rm' {placement}" in console
    ddp_dir, ddp_history = ddp
    for want, got in zip(ddp_history, straight, strict=True):  # the same rollouts, rewards, losses and gradient norms
        for name in ("objective/scores", "objective/scores/rm", "objective/kl", "loss/policy_avg", "loss/value_avg", "train/grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (engine, want["step"], name)
    reference, start, final = weights(ddp_dir), weights(tiny_model_dir), weights(tmp_path / "straight")  # full weights
    assert max((reference[n] - start[n]).abs().max() for n in start) > 1e-3  # the weights moved
    assert final.keys() == reference.keys() and any(n.startswith("critic/") for n in final)
    assert max((final[n] - reference[n]).abs().max() for n in final) < 1e-4
    weights(tmp_path / "straight" / "checkpoint-1")  # every checkpoint holds loadable full weights

    # ZeRO-3 resumes generating on sharded weights in lockstep (ds3_gather_for_generation false): the same samples.
    # Resumed through tests/multiprocess/ppo_ranks.py (the same build and train), which reports each rank.
    lockstep = ["--ds3_gather_for_generation", "false"] if engine == "zero3" else []
    reporting = [*ENGINES[engine][:-1], "tests/multiprocess/ppo_ranks.py"]
    resumed, _ = ppo(reporting, tmp_path / "resumed", tiny_model_dir, synthetic_data_dir, reward_model,
                     "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-1"), *lockstep)  # fmt: skip
    ranks = [json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(ranks[0]["sources"]) & set(ranks[1]["sources"])  # each rank rolls out its own prompts
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the same full weights gathered on both ranks
    for want, got in zip(straight, resumed, strict=True):
        for name, value in want.items():
            if name != "eps":
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (engine, want["step"], name)
    again = weights(tmp_path / "resumed")
    assert max((again[n] - final[n]).abs().max() for n in final) < 1e-6


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_the_shipped_zero_configs_train_in_bf16_with_the_value_head(engine, tmp_path, tiny_model_dir, synthetic_data_dir):
    # DeepSpeed's bf16 mode holds every weight in bf16: the fp32 value head is cast before ZeRO-3 partitions it
    # (it cannot partition a mix), and the value head computes in the dtype it was given.
    out = tmp_path / "run"
    extra = ["--reward", "trainer_helpers:completion_length", "--total_episodes", "16"]
    result = launch(ENGINES[engine], out, tiny_model_dir, synthetic_data_dir, *extra, precision="bf16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Gradient accumulation steps mismatch" not in result.stdout + result.stderr  # by design: quiet.py
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss/value_avg"])) for h in history)
    final, start = weights(out), weights(tiny_model_dir)
    assert max((final[n] - start[n]).abs().max() for n in start) > 1e-3


@pytest.mark.slow
def test_an_fsdp_config_on_a_machine_where_accelerate_cannot_enable_it_stops(tmp_path, tiny_model_dir, synthetic_data_dir):
    """accelerate turns FSDP on for GPUs only: on these CPU ranks it would set up plain data parallelism."""
    result = launch(ENGINES["fsdp2"][:-1] + ["scripts/ppo.py"], tmp_path / "run", tiny_model_dir, synthetic_data_dir, "--reward", "trainer_helpers:completion_length")
    assert result.returncode != 0
    assert "vlm-rl ppo: error: the launch asks for FSDP but accelerate set up MULTI_CPU" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.parametrize(
    "running, fsdp2, asked, error",
    [
        (DistributedType.MULTI_CPU, False, {"ACCELERATE_USE_FSDP": "true"}, "asks for FSDP but accelerate set up MULTI_CPU"),
        (DistributedType.NO, False, {"fsdp": True}, "asks for FSDP but accelerate set up NO"),
        (DistributedType.MULTI_GPU, False, {"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DeepSpeed but accelerate set up MULTI_GPU"),
        (DistributedType.NO, False, {"deepspeed": True}, "asks for DeepSpeed"),
        (DistributedType.FSDP, False, {"ACCELERATE_USE_FSDP": "true"}, "FSDP1 is not supported"),
        (DistributedType.FSDP, True, {"ACCELERATE_USE_FSDP": "true"}, None),
        (DistributedType.DEEPSPEED, False, {"ACCELERATE_USE_DEEPSPEED": "true"}, None),
        (DistributedType.MULTI_CPU, False, {}, None),
    ],
)
def test_the_engine_asked_for_is_the_engine_running_or_the_run_stops(monkeypatch, running, fsdp2, asked, error):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
        if name in asked:
            monkeypatch.setenv(name, asked[name])
    accelerator = SimpleNamespace(distributed_type=running, is_fsdp2=fsdp2)
    flags = {k: v for k, v in asked.items() if k in ("fsdp", "deepspeed")}
    if error is None:
        check_engine(accelerator, **flags)
    else:
        with pytest.raises(ConfigError, match=error):
            check_engine(accelerator, **flags)
