"""wandb and trackio through `report_to`: the metrics and the table of sample generations, with its images, reach the
run's own files (wandb offline, trackio local); without either installed, a run with sample tables still works.
The wandb and trackio tests are skipped where they are not installed (`pip install -e ".[wandb,trackio]"`)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from trainer_helpers import log_history, make_trainer

from vlm_rl.training import integrations

COLUMNS = ["iteration", "prompt", "image", "completion", "score", "score/exact_match"]


def short_run(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> list[dict]:
    """Two PPO iterations (logging every one) showing 2 samples each; returns the run's log history."""
    make_trainer(tmp_path, model_dir, data_dir, total_episodes=16, num_sample_generations=2, **overrides).train()
    history = log_history(tmp_path / "run")
    assert [h["step"] for h in history] == [1, 2]
    return history


def test_wandb_offline_run_holds_the_metrics_and_the_samples_table_with_images(
    tmp_path, monkeypatch, tiny_model_dir, synthetic_data_dir
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("DIR", "DATA_DIR", "CACHE_DIR", "CONFIG_DIR"):  # nothing written outside tmp_path
        (tmp_path / f"wandb_{name.lower()}").mkdir()
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / f"wandb_{name.lower()}"))
    history = short_run(tmp_path, tiny_model_dir, synthetic_data_dir, report_to="wandb")
    wandb.finish()
    wandb.teardown()  # waits for wandb-core to finish writing the run's files

    (run_dir,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    log = log_file.read_bytes()  # the run's record log: each metric's name and value as JSON text
    for entry in history:
        for name, value in entry.items():
            if name != "step":
                assert name.encode() in log and json.dumps(value).encode() in log, (entry["step"], name, value)
    # A logged table is the run's `run-<id>-samples` artifact: its table JSON and each image file, staged on disk
    # until synced (files by content hash).
    assert f"run-{run_dir.name.rsplit('-', 1)[-1]}-samples".encode() in log
    staging = tmp_path / "wandb_data_dir" / "artifacts" / "staging"
    by_hash = {hashlib.sha256(b).hexdigest(): b for b in (p.read_bytes() for p in staging.iterdir())}
    tables = [t for t in map(json_or_none, by_hash.values()) if isinstance(t, dict) and t.get("_type") == "table"]
    assert sorted(row[0] for t in tables for row in t["data"]) == [1, 1, 2, 2]
    for table in tables:
        assert table["columns"] == COLUMNS
        for row in table["data"]:
            image = row[COLUMNS.index("image")]
            assert image["_type"] == "image-file" and image["path"].encode() in log
            with Image.open(io.BytesIO(by_hash[image["sha256"]])) as png:
                assert png.size == (image["width"], image["height"])
            assert isinstance(row[COLUMNS.index("completion")], str) and row[COLUMNS.index("score")] is not None


def json_or_none(data: bytes):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def test_trackio_local_run_holds_the_metrics_and_the_samples_table_with_images(
    tmp_path, monkeypatch, tiny_model_dir, synthetic_data_dir
):
    # trackio fixes its storage folder (TRACKIO_DIR) when first imported: this test must be the first to import it.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    pytest.importorskip("trackio")
    from trackio import utils
    from trackio.sqlite_storage import SQLiteStorage

    assert utils.TRACKIO_DIR == tmp_path / "trackio", "trackio was imported earlier, with another storage folder"
    history = short_run(tmp_path, tiny_model_dir, synthetic_data_dir, report_to="trackio", project="vlm-rl-test", run_name="run")

    logs = SQLiteStorage.get_logs("vlm-rl-test", "run")  # the training's end finished the run (trackio.finish)
    metrics = [row for row in logs if "train/objective/scores" in row]
    assert [row["train/global_step"] for row in metrics] == [1, 2]
    for entry, row in zip(history, metrics):
        for name, value in entry.items():
            if name != "step":
                assert row[f"train/{name}"] == pytest.approx(value, nan_ok=True), (entry["step"], name)
    tables = [row for row in logs if "samples" in row]
    assert [row["train/global_step"] for row in tables] == [1, 2]
    for row in tables:
        samples = row["samples"]["_value"]
        assert [list(s) for s in samples] == [COLUMNS] * 2
        assert [s["iteration"] for s in samples] == [row["train/global_step"]] * 2
        for s in samples:
            assert s["image"]["_type"] == "trackio.image"
            with Image.open(utils.MEDIA_DIR / s["image"]["file_path"]) as png:
                assert png.size[0] > 0


def test_without_wandb_or_trackio_a_run_shows_its_samples_and_logs_its_metrics(
    tmp_path, monkeypatch, capsys, tiny_model_dir, synthetic_data_dir
):
    for name in ("wandb", "trackio"):  # as if not installed: importing either fails
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(integrations, "is_wandb_available", lambda: False)
    monkeypatch.setattr(integrations, "is_trackio_available", lambda: False)
    short_run(tmp_path, tiny_model_dir, synthetic_data_dir, report_to="tensorboard")
    out = capsys.readouterr().out
    assert "samples at iteration 1:" in out and "samples at iteration 2:" in out
    (events,) = (tmp_path / "run" / "runs").rglob("events.out.tfevents.*")
    # the run's start says where it writes: its outputs, and the TensorBoard logs' own directory
    assert f"outputs in {tmp_path / 'run'} (" in out and f"TensorBoard logs in {events.parent} (tensorboard --logdir {events.parent.parent})" in out
