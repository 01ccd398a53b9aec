"""Nothing lost, nothing silent: preemption, incomplete checkpoints, changed arguments on resume, non-finite
losses, and an output_dir that already holds a run."""

from __future__ import annotations

import logging
from collections import defaultdict
import math
import os
import signal

import pytest
import torch
from trainer_helpers import completion_length, log_history, make_trainer, parameters
from transformers import Qwen2VLForConditionalGeneration

from vlm_rl.training import checkpoint as ckpt
from vlm_rl.training import trainer as trainer_module
from vlm_rl.errors import UserError
from vlm_rl.training.preemption import Preempted
from vlm_rl.training.trainer import NonFiniteError

# A real signal (the policy and value head move every iteration), 8 prompts per iteration, 2 optimiser steps each.
SIGNAL = dict(
    reward=[completion_length], learning_rate=1e-2, kl_coef=0.5, max_new_tokens=8, per_device_train_batch_size=4,
    gradient_accumulation_steps=2, num_ppo_epochs=2, total_episodes=32,
)  # fmt: skip


class SigtermOnCall:
    """`completion_length` that sends this process SIGTERM during its `at`-th call (mid-iteration)."""

    name = "completion_length"

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return completion_length(prompts, completions)


def assert_same_run(want: list[dict], got: list[dict]) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for a, b in zip(want, got):
        for name, value in a.items():
            if name != "eps":
                assert b[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (a["step"], name)


def test_sigterm_writes_a_checkpoint_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_model_dir, synthetic_data_dir):
    straight = make_trainer(tmp_path / "a", tiny_model_dir, synthetic_data_dir, **SIGNAL)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", tiny_model_dir, synthetic_data_dir, **{**SIGNAL, "reward": [SigtermOnCall(at=2)]})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        interrupted.train()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    run = tmp_path / "b" / "run"
    assert "--resume_from_checkpoint" in str(stopped.value) and str(run / "checkpoint-2") in str(stopped.value)
    assert ckpt.list_checkpoints(run) == [run / "checkpoint-2"]  # the iteration under way was finished, then saved
    assert ckpt.problem_with(run / "checkpoint-2") is None

    resumed = make_trainer(tmp_path / "b", tiny_model_dir, synthetic_data_dir, **SIGNAL)
    resumed.train(resume_from_checkpoint="latest")
    assert_same_run(log_history(tmp_path / "a" / "run"), log_history(run))
    want = parameters(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "a" / "run"))
    got = parameters(Qwen2VLForConditionalGeneration.from_pretrained(run))
    assert all(torch.allclose(want[n], got[n], atol=1e-6) for n in want)


def test_latest_skips_incomplete_checkpoints_and_an_explicit_one_is_an_error(tmp_path, tiny_model_dir, synthetic_data_dir, caplog):
    settings = {**SIGNAL, "total_episodes": 24, "save_steps": 1, "save_total_limit": None}
    make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **settings).train()
    run = tmp_path / "run"
    (run / "checkpoint-3" / "optimizer.pt").unlink()  # a file lost
    os.remove(run / "checkpoint-2" / ckpt.MANIFEST)  # a save interrupted before its manifest
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-3 is incomplete: optimizer.pt is missing"):
        make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **settings).train(resume_from_checkpoint=str(run / "checkpoint-3"))

    resumed = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **settings)
    with caplog.at_level(logging.WARNING, logger="vlm_rl.training.trainer"):
        resumed.train(resume_from_checkpoint="latest")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-3: optimizer.pt is missing" in caplog.text
    assert "checkpoint-2: no manifest.json" in caplog.text
    assert [h["step"] for h in log_history(run)] == [1, 2, 3]  # went on from checkpoint-1


def test_resume_with_changed_arguments(tmp_path, tiny_model_dir, synthetic_data_dir, caplog):
    settings = {**SIGNAL, "total_episodes": 24, "save_steps": 1, "lr_scheduler_type": "constant"}
    make_trainer(tmp_path / "a", tiny_model_dir, synthetic_data_dir, **settings).train()
    checkpoint = str(tmp_path / "a" / "run" / "checkpoint-1")

    fixed = make_trainer(tmp_path / "b", tiny_model_dir, synthetic_data_dir, **{**settings, "per_device_train_batch_size": 2})
    with pytest.raises(ckpt.CheckpointError, match=r"per_device_train_batch_size: 4 in the checkpoint, 2 now"):
        fixed.train(resume_from_checkpoint=checkpoint)

    changed = make_trainer(tmp_path / "c", tiny_model_dir, synthetic_data_dir, **{**settings, "learning_rate": 2e-3, "kl_coef": 0.1})
    with caplog.at_level(logging.WARNING, logger="vlm_rl.training.trainer"):
        changed.train(resume_from_checkpoint=checkpoint)
    assert "learning_rate: 0.01 in the checkpoint, 0.002 now" in caplog.text and "kl_coef: 0.5" in caplog.text
    history = log_history(tmp_path / "c" / "run")
    assert [h["lr"] for h in history] == [1e-2, 2e-3, 2e-3]  # the new learning rate takes effect
    assert [h["episode"] for h in history] == [8, 16, 24]  # the episode counter goes on
    assert all(g["lr"] == 2e-3 for g in changed.optimizer.param_groups)


def test_a_non_finite_loss_skips_that_step_and_is_logged(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    calls = []
    real_value_loss = trainer_module.value_loss

    def value_loss_nan_at_third_call(*args):
        loss, stats = real_value_loss(*args)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), stats  # 2nd step of the first iteration

    monkeypatch.setattr(trainer_module, "value_loss", value_loss_nan_at_third_call)
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **{**SIGNAL, "total_episodes": 16})
    trainer.train()
    assert [h["train/skipped_steps"] for h in log_history(tmp_path / "run")] == [1.0, 0.0]
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2 * 2 - 1}
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_steps_in_a_row_stop_the_run_with_a_checkpoint_from_before(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    real_value_loss = trainer_module.value_loss
    monkeypatch.setattr(trainer_module, "value_loss", lambda *a: (real_value_loss(*a)[0] * math.inf, real_value_loss(*a)[1]))
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **{**SIGNAL, "max_skipped_steps": 3})
    initial = parameters(trainer.model.policy)
    # Steps 1-2 (iteration 1) and 3 (iteration 2) skipped: iteration 2 is finished (its step 4 skipped too), then saved.
    with pytest.raises(NonFiniteError, match=r"3 optimiser steps in a row.*stopped after iteration 2.*checkpoint-2"):
        trainer.train()
    saved = parameters(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "run" / "checkpoint-2"))
    assert all(torch.equal(saved[n.removeprefix("policy.")], p) for n, p in initial.items())  # nothing was stepped


def test_a_non_finite_stop_mid_iteration_leaves_the_checkpoint_its_name_says(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    """The run stops at the end of the iteration where max_skipped_steps was reached: its checkpoint is the one an
    uninterrupted run writes there (weights, optimiser, scheduler, RNG), never one named for the previous iteration
    holding weights this iteration already changed."""
    from safetensors.torch import load_file

    real_value_loss = trainer_module.value_loss

    def nan_in_the_fourth_step(calls: list):  # 2 micro-batches per step: the 4th step is iteration 2's second
        def value_loss(*args):
            loss, stats = real_value_loss(*args)
            calls.append(1)
            return (loss * math.nan if len(calls) == 7 else loss), stats

        return value_loss

    monkeypatch.setattr(trainer_module, "value_loss", nan_in_the_fourth_step([]))
    stopped = make_trainer(tmp_path / "stopped", tiny_model_dir, synthetic_data_dir, **{**SIGNAL, "max_skipped_steps": 1})
    with pytest.raises(NonFiniteError, match="stopped after iteration 2"):
        stopped.train()
    monkeypatch.setattr(trainer_module, "value_loss", nan_in_the_fourth_step([]))
    straight = make_trainer(tmp_path / "straight", tiny_model_dir, synthetic_data_dir, **{**SIGNAL, "max_skipped_steps": 10, "save_steps": 1, "save_total_limit": None})
    straight.train()
    ours, theirs = tmp_path / "stopped" / "run", tmp_path / "straight" / "run"
    assert ckpt.list_checkpoints(ours) == [ours / "checkpoint-2"]
    want, got = theirs / "checkpoint-2", ours / "checkpoint-2"
    assert ckpt.problem_with(got) is None
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(want / name), load_file(got / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rng = sorted(p.name for p in want.glob("rng_state*"))
    assert rng and rng == sorted(p.name for p in got.glob("rng_state*"))
    for name in ["optimizer.pt", "scheduler.pt", *rng]:
        assert same(torch.load(want / name, weights_only=False), torch.load(got / name, weights_only=False)), name


def same(a, b) -> bool:
    """Equal, element for element, through dicts, lists and tuples of tensors, arrays and plain values."""
    import numpy as np

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


def test_a_non_finite_step_deepspeed_applied_anyway_stops_the_run(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    """Under DeepSpeed the engine steps before PPO sees the gradient norm: a step PPO would skip but the engine
    applied (an engine without an overflow check) is an error, never logged as skipped."""

    class EngineThatStepped(torch.nn.Module):  # what PPO asks of a DeepSpeed engine here
        def __init__(self, module):
            super().__init__()
            self.module = module

        def was_step_applied(self) -> bool:
            return True

    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **SIGNAL)
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.num_total_batches)
    trainer.model_wrapped = EngineThatStepped(trainer.model)
    monkeypatch.setattr(trainer_module, "is_deepspeed", lambda accelerator: True)
    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", lambda parameters, max_norm: torch.tensor(math.nan))
    with pytest.raises(NonFiniteError, match="DeepSpeed applied an optimizer step whose loss or gradient norm"):
        trainer.apply_step(torch.zeros(2), False, defaultdict(list))


def test_an_output_dir_holding_a_run_is_refused_unless_overwritten(tmp_path, tiny_model_dir, synthetic_data_dir):
    settings = {**SIGNAL, "total_episodes": 8}
    make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **settings).train()
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    first = (run / "trainer_state.json").read_text()
    with pytest.raises(UserError, match=r"already holds a PPO run.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **settings).train()
    assert (run / "trainer_state.json").read_text() == first  # untouched
    make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, **{**settings, "overwrite_output_dir": True, "seed": 1}).train()
    assert (run / "trainer_state.json").read_text() != first
    assert (run / "notes.txt").read_text() == "mine"  # what the run did not write stays
    assert not [p for p in run.iterdir() if p.name.startswith(".replaced")]  # the old run, set aside, is gone
    assert (run / "ppo_config.yaml").exists()

