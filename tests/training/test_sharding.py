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
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)  # a hang fails, not blocks


CRITICS = {  # the critic's own weights: a separate backbone, or a second LoRA adapter on the LoRA policy's base
    "separate": ["--critic", "separate"],
    "lora": ["--critic", "lora", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--total_episodes", "16"],
}


def ppo(engine: list[str], out: Path, model_dir, data_dir, reward_model: Path, *extra: str, critic: str = "separate") -> tuple[list[dict], str]:
    """(log history, console output) of a run rewarded by response length and a learned reward model, with a critic
    of its own weights (sharded, saved and resumed like the policy): 3 iterations with a separate critic, 2 with
    a lora critic."""
    result = launch(engine, out, model_dir, data_dir, "--reward", "trainer_helpers:completion_length", f"{reward_model}:0.5", *CRITICS[critic], *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())["log_history"], result.stdout + result.stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The trained weights saved in `path`, by name: the policy's (full, loaded with `from_pretrained`, or its LoRA
    adapter) and the critic's (in `path/critic/`: a separate critic's backbone or a lora critic's adapter, and its
    value head)."""
    if (path / "adapter_config.json").exists():
        policy = load_file(path / "adapter_model.safetensors")
    else:
        policy = dict(Qwen2VLForConditionalGeneration.from_pretrained(path).named_parameters())
    files = [path / "critic" / f for f in ("model.safetensors", "adapter_model.safetensors", "value_head.safetensors")]
    return {**policy, **{f"critic/{k}": v for f in files if f.exists() for k, v in load_file(f).items()}}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    torch.manual_seed(0)
    model = VLMRewardModel.from_base(str(tiny_model_dir), name="rm")
    torch.nn.init.normal_(model.head.weight, std=1.0)  # scores that differ between responses
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def uneven_images(tmp_path_factory, synthetic_data_dir, video_data_dir) -> Path:
    """The synthetic prompts with some made text-only and two made clips, so that the ranks hold uneven images and
    videos: in iteration 1 rank 1 has neither (rank 0 three pictures and a clip), in iteration 2 one of rank 0's
    prompts and one of rank 1's are text-only and one of rank 1's is a clip (rank 0 has none), iteration 3 holds no
    clip. (The prompts of each iteration and rank: the trainer's shuffle, seed 0 of configs/ppo_tiny.yaml, 4 per rank.)
    A run whose data holds videos calls the tower once per kind in every forward of every rank (dummy_image.py)."""
    rows = [json.loads(line) for line in (synthetic_data_dir / "train.jsonl").read_text().splitlines()]
    clip_rows = [json.loads(line) for line in (video_data_dir / "train.jsonl").read_text().splitlines()]
    clips = [{**row, "video": str(video_data_dir / row["video"])} for row in clip_rows if "video" in row][:2]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    text_only = {*order[4:8], order[8], order[12]}
    for i, row in enumerate(rows):
        image = row.pop("image")
        if i not in text_only:
            row["image"] = str(synthetic_data_dir / image)
    rows[order[0]], rows[order[13]] = clips
    out = tmp_path_factory.mktemp("uneven")
    (out / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir, uneven_images, reward_model):
    """The DDP run each critic's sharded runs are compared with: (output directory, log history), made once."""
    runs = {}

    def run(critic: str) -> tuple[Path, list[dict]]:
        if critic not in runs:
            out = tmp_path_factory.mktemp(f"ddp-{critic}") / "run"
            history, _ = ppo(["--multi_gpu", "scripts/ppo.py"], out, tiny_model_dir, uneven_images, reward_model, "--use_cpu", "true", critic=critic)
            runs[critic] = out, history
        return runs[critic]

    return run


# The LoRA critic where its adapters' parameters are sharded (ZeRO-3, FSDP2); under ZeRO-2, which shards optimiser
# states only (as ZeRO-3 does too), the separate critic alone: two launches fewer for the suite's time budget.
@pytest.mark.parametrize(("engine", "critic"), [
    ("zero2", "separate"), ("zero3", "separate"), ("zero3", "lora"), ("fsdp2", "separate"), ("fsdp2", "lora"),
])
@pytest.mark.slow
@needs_deepspeed
def test_sharded_ppo_trains_like_ddp_saves_full_weights_and_resumes_exactly(engine, critic, ddp, tmp_path, tiny_model_dir, uneven_images, reward_model):
    # The ranks hold uneven images and clips (`uneven_images`): a rank without either runs its vision towers on a dummy
    # image wherever another rank runs them (once per kind), else ZeRO-3 and FSDP2 would wait forever for its shards.
    straight, console = ppo(ENGINES[engine], tmp_path / "straight", tiny_model_dir, uneven_images, reward_model, critic=critic)
    placement = "sharded" if SHARDED[engine] else "whole on each rank"
    reference = f"reference {placement}, " if critic == "separate" else ""  # (a LoRA policy's reference: adapters off)
    assert f"policy {placement}, {reference}reward model 'rm' {placement}" in console
    ddp_dir, ddp_history = ddp(critic)
    for want, got in zip(ddp_history, straight, strict=True):  # the same rollouts, rewards, losses and gradient norms
        for name in ("objective/scores", "objective/scores/rm", "objective/kl", "loss/policy_avg", "loss/value_avg", "train/grad_norm"):
            # (the KL is a mean of differences of logprobs of size 1-10, each as exact as fp32 after the engines'
            # other summation orders, ~1e-6: an absolute tolerance; seen 1.4e-6 apart with the clips)
            close = dict(rel=0, abs=5e-6) if name == "objective/kl" else dict(rel=1e-5, abs=1e-6)
            assert got[name] == pytest.approx(want[name], **close), (engine, want["step"], name)
    reference, final = weights(ddp_dir), weights(tmp_path / "straight")  # full weights
    if critic == "separate":
        start = weights(tiny_model_dir)
        assert max((reference[n] - start[n]).abs().max() for n in start) > 1e-3  # the weights moved
    else:  # both adapters trained (their B matrices start at 0)
        assert all(v.abs().max() > 1e-4 for n, v in reference.items() if "lora_B" in n)
        assert any(n.startswith("critic/") and "lora_B" in n for n in reference)
    assert final.keys() == reference.keys() and any(n.startswith("critic/") for n in final)
    assert max((final[n] - reference[n]).abs().max() for n in final) < 1e-4
    weights(tmp_path / "straight" / "checkpoint-1")  # every checkpoint holds loadable full weights

    # ZeRO-3 resumes generating on sharded weights in lockstep (ds3_gather_for_generation false): the same samples.
    # Resumed through tests/multiprocess/ppo_ranks.py (the same build and train), which reports each rank.
    lockstep = ["--ds3_gather_for_generation", "false"] if engine == "zero3" else []
    reporting = [*ENGINES[engine][:-1], "tests/multiprocess/ppo_ranks.py"]
    resumed, _ = ppo(reporting, tmp_path / "resumed", tiny_model_dir, uneven_images, reward_model,
                     "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-1"), *lockstep, critic=critic)  # fmt: skip
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
    assert history[0]["objective/kl"] == 0  # the reference cast to bf16 with the policy: the policy's own start
    final, start = weights(out), weights(tiny_model_dir)
    assert max((final[n] - start[n]).abs().max() for n in start) > 1e-3


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_that_would_apply_a_non_finite_step_is_refused(tmp_path, tiny_model_dir, synthetic_data_dir):
    """DeepSpeed steps inside the last backward, so PPO skips a non-finite step only if the engine does: its ZeRO and
    fp16/bf16 optimizers check the gradient norm; without ZeRO in fp32 it steps whatever the gradient (a NaN update
    was applied and the next rollout failed on NaN probabilities). That launch stops before training, saying why."""
    config = tmp_path / "zero0.yaml"
    config.write_text((REPO / "configs/accelerate/zero2.yaml").read_text().replace("zero_stage: 2", "zero_stage: 0"))
    result = launch(["--config_file", str(config), "scripts/ppo.py"], tmp_path / "run", tiny_model_dir, synthetic_data_dir, "--reward", "trainer_helpers:completion_length")
    assert result.returncode != 0
    assert "vlm-rl ppo: error: DeepSpeed without ZeRO (zero_stage 0) in fp32 applies every optimizer step" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint-1").exists()


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
