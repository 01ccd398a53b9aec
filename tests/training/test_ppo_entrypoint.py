"""`accelerate launch scripts/ppo.py --config configs/ppo_tiny.yaml`, single- and multi-process, as a user runs it."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@contextmanager
def cpu_load(processes: int = 1):
    """`processes` busy loops for the duration: the machine loaded (a finished 2-rank run was seen to abort at exit
    under load)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def run(cmd, tmp_path, timeout=600):
    env = {**os.environ, "VLM_RL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}  # this checkout; rewards from tests/trainer_helpers.py
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
def test_two_ranks_sample_apart_train_in_step_resume_exactly_and_whiten_globally(tmp_path, tiny_model_dir, synthetic_data_dir):
    """2 DDP ranks (accelerate's torchrun launcher with use_cpu) with a separate critic: each rank its own prompts,
    weights in step, exact resume (policy and critic), advantages whitened over both ranks, long prompts dropped
    the same on both."""
    # 32 prompts of 36-50 tokens; max_prompt_length 41 keeps 24: 3 global batches of 2 ranks x (2 x 2 accumulated).
    args = ["--config", "configs/ppo_tiny.yaml", "--report_to", "none", "--model_name_or_path", str(tiny_model_dir),
            "--train_data", str(synthetic_data_dir / "train.jsonl"), "--reward", "trainer_helpers:completion_length",
            "--skip_long_prompts", "true", "--max_prompt_length", "41", "--learning_rate", "1e-2", "--kl_coef", "0.5",
            "--max_new_tokens", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--num_mini_batches", "1", "--num_ppo_epochs", "2", "--total_episodes", "24", "--save_steps", "1", "--save_total_limit", "5",
            "--critic", "separate", "--critic_learning_rate", "3e-3"]
    launch = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "tests/multiprocess/ppo_ranks.py", *args]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    console = run([*launch, "--output_dir", str(straight)], tmp_path)
    run([*launch, "--output_dir", str(resumed), "--resume_from_checkpoint", str(straight / "checkpoint-1")], tmp_path)
    printed = console.stdout + console.stderr
    assert printed.count("skip_long_prompts: dropped") == 1, printed[-3000:]  # a warning once per run, not per rank
    assert "find_unused_parameters" not in printed  # DDP told every parameter takes part (the tower is frozen)

    ranks = [json.loads((straight / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["sources"]) & set(ranks[1]["sources"])  # each rank rolls out its own prompts
    assert [r["num_prompts"] for r in ranks] == [24, 24]  # the same prompts dropped on both ranks
    assert (straight / "checkpoint-1" / "critic" / "value_head.safetensors").exists()
    history = json.loads((straight / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["objective/kl"] != 0 for h in history[1:])
    # Resumed from checkpoint-1 on 2 ranks: each rank's weights and every later metric as in the uninterrupted run.
    again = [json.loads((resumed / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["checksum"] for r in again] == [r["checksum"] for r in ranks]  # policy and critic (all parameters)
    assert len({r["checksum"] for r in ranks}) == 1  # gradients all-reduced: identical weights on both ranks
    resumed_history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    for want, got in zip(history[1:], resumed_history[1:], strict=True):
        for name, value in want.items():
            if name != "eps":
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (want["step"], name)
    # Advantages are whitened over both ranks' tokens together: mean 0 and variance 1 globally, not per rank.
    advantages = [torch.tensor(r["advantages"])[torch.tensor(r["train_mask"])] for r in ranks]
    both = torch.cat(advantages)
    assert abs(both.mean()) < 1e-5 and both.var() == pytest.approx(1.0, rel=1e-4)
    assert max(abs(a.mean()) for a in advantages) > 1e-3  # while each rank's own share is not centred


def test_repeated_reward_flags_are_all_kept():
    from vlm_rl.arguments import merge_repeated_flag

    argv = ["--reward", "exact_match:1.0", "--output_dir", "x", "--reward", "length:0.5", "rm_dir:0.2"]
    assert merge_repeated_flag(argv, "--reward") == ["--output_dir", "x", "--reward", "exact_match:1.0", "length:0.5", "rm_dir:0.2"]
    assert merge_repeated_flag(["--output_dir", "x"], "--reward") == ["--output_dir", "x"]


def test_an_output_dir_holding_a_run_is_refused_before_any_model_loads(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    from vlm_rl import ppo
    from vlm_rl.training.config import PPOConfig
    from vlm_rl.errors import UserError

    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    config = PPOConfig(output_dir=str(tmp_path / "run"), model_name_or_path=str(tiny_model_dir), train_data=str(synthetic_data_dir / "train.jsonl"), use_cpu=True, report_to="none")
    monkeypatch.setattr(ppo, "load_policy_and_reference", lambda config: pytest.fail("a model was loaded"))
    monkeypatch.setattr(ppo, "load_processor", lambda *a: pytest.fail("the processor was loaded"))
    with pytest.raises(UserError, match="already holds a PPO run"):
        ppo.build_trainer(config)
    assert ppo.parse_args(["--output_dir", "x", "--overwrite"]).overwrite_output_dir  # the alias


@pytest.mark.parametrize(
    "critic, says",
    [(None, "policy and processor"), ("shared", "policy, value head and processor"), ("separate", "policy, separate critic (critic/) and processor")],
)
def test_the_last_line_names_what_was_saved(critic, says):
    from types import SimpleNamespace

    from vlm_rl.ppo import what_was_saved

    model = SimpleNamespace(critic=None if critic is None else SimpleNamespace(mode=critic))
    trainer = SimpleNamespace(model_wrapped=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    assert what_was_saved(trainer) == says
