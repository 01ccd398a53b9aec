"""The checkpoint format on its own (training/checkpoint.py, output_dir.py): ordering past ten checkpoints, the
manifest catching a file changed in place, what a resume may change, the output directory claimed and set aside."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.trainer_utils import rotate_checkpoints

from trainer_helpers import make_trainer
from vlm_rl.errors import UserError
from vlm_rl.training import checkpoint as ckpt
from vlm_rl.training.output_dir import previous_run, refuse_previous_run


def write_checkpoint(out: Path, step: int, payload: bytes = b"weights", complete: bool = True) -> Path:
    """A checkpoint-N as save_checkpoint publishes it: files in a staging directory, the manifest last, renamed."""
    staging = ckpt.staging_dir(out, step)
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(payload)
    (staging / "deepspeed").mkdir()  # the engine's own folder, as DeepSpeed saves one
    (staging / "deepspeed" / "optim_states.pt").write_bytes(b"shard")
    (staging / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    if complete:
        ckpt.write_manifest(staging, step=step, num_processes=1)
    final = out / f"{ckpt.PREFIX}{step}"
    ckpt.publish(staging, final)
    return final


def test_checkpoints_past_ten_are_ordered_by_step_not_by_name(tmp_path):
    for step in (1, 2, 9, 10, 11, 100):
        write_checkpoint(tmp_path, step)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [1, 2, 9, 10, 11, 100]
    assert ckpt.latest_complete(tmp_path) == (tmp_path / "checkpoint-100", [])
    assert ckpt.resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-100"
    # transformers' rotation (save_total_limit), as save_checkpoint calls it, keeps the newest by step
    rotate_checkpoints(str(tmp_path), save_total_limit=2, use_mtime=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-11", "checkpoint-100"]


def test_latest_skips_newer_incomplete_checkpoints_past_ten_and_says_why(tmp_path, caplog):
    for step in (9, 10):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 11, complete=False)
    with caplog.at_level(logging.WARNING, logger="vlm_rl.training.checkpoint"):
        assert ckpt.resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-11'}: no manifest.json" in caplog.text
    found, skipped = ckpt.latest_complete(tmp_path)
    assert found == tmp_path / "checkpoint-10"
    assert [(p.name, "manifest.json" in why) for p, why in skipped] == [("checkpoint-11", True)]
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-11 is incomplete: no manifest.json"):
        ckpt.resolve_checkpoint(str(tmp_path / "checkpoint-11"), tmp_path)


def test_a_file_changed_in_place_without_changing_its_size_is_caught(tmp_path):
    path = write_checkpoint(tmp_path, 3, payload=b"A" * 64)
    assert ckpt.problem_with(path) is None
    (path / "model.safetensors").write_bytes(b"B" * 64)  # same size, other bytes
    assert ckpt.problem_with(path) == "model.safetensors does not match its checksum"
    assert ckpt.latest_complete(tmp_path)[0] is None


def test_files_in_subfolders_are_in_the_manifest(tmp_path):
    path = write_checkpoint(tmp_path, 1)
    assert set(ckpt.read_manifest(path)["files"]) == {"model.safetensors", "trainer_state.json", "deepspeed/optim_states.pt"}
    (path / "deepspeed" / "optim_states.pt").write_bytes(b"SHARD")
    assert ckpt.problem_with(path) == "deepspeed/optim_states.pt does not match its checksum"


def test_publishing_over_a_leftover_replaces_it_and_leaves_nothing_aside(tmp_path):
    leftover = tmp_path / "checkpoint-4"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half-written")
    path = write_checkpoint(tmp_path, 4, payload=b"whole")
    assert (path / "model.safetensors").read_bytes() == b"whole" and ckpt.problem_with(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # no staging or set-aside folder left


def test_a_truncated_or_missing_file_is_caught(tmp_path):
    path = write_checkpoint(tmp_path, 1, payload=b"A" * 64)
    (path / "model.safetensors").write_bytes(b"A" * 63)
    assert ckpt.problem_with(path) == "model.safetensors has 63 bytes, the manifest says 64"
    (path / "model.safetensors").unlink()
    assert ckpt.problem_with(path) == "model.safetensors is missing"


def test_no_checkpoint_at_all_is_an_error_naming_the_directory(tmp_path):
    assert ckpt.resolve_checkpoint(None, tmp_path) is None and ckpt.resolve_checkpoint("false", tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path} has no complete checkpoint-N"):
        ckpt.resolve_checkpoint(True, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.resolve_checkpoint(str(tmp_path / "checkpoint-7"), tmp_path)


@pytest.mark.parametrize(
    "field, saved, now, fixed",
    [
        ("critic", "shared", "separate", True),
        ("advantage_estimator", "gae", "grpo", True),
        ("num_generations", 1, 4, True),
        ("per_device_train_batch_size", 4, 8, True),
        ("seed", 0, 1, True),
        ("learning_rate", 1e-3, 2e-3, False),
        ("kl_coef", 0.05, 0.1, False),
        ("output_dir", "a", "b", None),  # bookkeeping: neither
    ],
)
def test_what_a_resume_may_change(field, saved, now, fixed):
    errors, warnings = ckpt.resume_changes({field: saved, "same": 1}, {field: now, "same": 1})
    line = f"{field}: {saved!r} in the checkpoint, {now!r} now"
    assert (errors, warnings) == (([line], []) if fixed else ([], [line]) if fixed is False else ([], []))


def test_rng_state_round_trips_every_generator(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_rng_state(tmp_path, rank=1)
    want = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.load_rng_state(tmp_path, rank=1)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want
    with pytest.raises(ckpt.CheckpointError, match="rng_state_0.pth not found: this checkpoint was written by fewer processes"):
        ckpt.load_rng_state(tmp_path, rank=0)


def test_an_earlier_run_is_named_and_refused_and_other_files_are_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert previous_run(tmp_path) == []
    refuse_previous_run(tmp_path)  # nothing to refuse
    write_checkpoint(tmp_path, 12)
    write_checkpoint(tmp_path, 2)
    (tmp_path / "trainer_state.json").write_text("{}")
    assert [p.name for p in previous_run(tmp_path)] == ["checkpoint-2", "checkpoint-12", "trainer_state.json"]
    with pytest.raises(UserError, match=r"already holds a PPO run \(checkpoint-2, checkpoint-12, trainer_state.json\).*--resume_from_checkpoint latest"):
        refuse_previous_run(tmp_path)


def test_the_final_save_replaces_the_leftover_of_an_interrupted_one(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir)
    out = Path(trainer.args.output_dir)
    leftover = out / ".final.staging"  # a save_final that died half-way
    leftover.mkdir(parents=True)
    (leftover / "stale.safetensors").write_text("half a model")
    trainer.save_final(str(out))
    assert not leftover.exists() and not (out / "stale.safetensors").exists()
    assert {"config.json", "trainer_state.json"} <= {f.name for f in out.iterdir()}
