"""`vlm-rl make-tiny-model` / `vlm-rl make-data` as a user runs them, plus the command list and bad commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import user_error

from vlm_rl.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def vlm_rl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vlm_rl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_make_tiny_model(tmp_path, tiny_model_dir):
    result = vlm_rl("make-tiny-model", "out/tiny", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "tiny"
    assert str(out.name) in result.stdout
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # --seed 1 is not the default seed: other weights, same tokenizer.
    assert (out / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_make_data(tmp_path):
    result = vlm_rl("make-data", "shapes", "--n", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "shapes"
    for name in ("train.jsonl", "test.jsonl", "preferences.jsonl", "preferences_test.jsonl"):
        assert (out / name).is_file(), name
    assert len(list((out / "images").glob("*.png"))) == 20
    from vlm_rl.data.formats import load_samples

    train, test = load_samples(out / "train.jsonl"), load_samples(out / "test.jsonl")
    assert len(train) == 16 and len(test) == 4
    assert train[0]["images"][0].mode == "RGB" and train[0]["completion"] == train[0]["answer"]
    # Same flags as the library defaults -> the same bytes.
    from vlm_rl.data.synthetic import make_synthetic_data

    lib = make_synthetic_data(tmp_path / "lib", n=20, seed=0)
    assert (lib / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_make_data_flags(tmp_path):
    result = vlm_rl("make-data", "d", "--n", "30", "--seed", "4", "--noise", "0.5", "--test-fraction", "0.5", "--tasks", "count", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "d" / "test.jsonl").read_text().splitlines()]
    assert len(train) == 15 and len(test) == 15
    assert {r["task"] for r in train + test} == {"count"}
    assert any(r["response"] != r["answer"] for r in train)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--noise", "1.5"], "noise"),
        (["--n", "0"], "n must be"),
        (["--tasks", "size"], "invalid choice"),
    ],
)
def test_make_data_bad_flags_are_usage_errors(tmp_path, args, message):
    result = vlm_rl("make-data", "d", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flag", ["--help", "-h", None])
def test_help_lists_the_commands(tmp_path, flag):
    result = vlm_rl(*([flag] if flag else []), cwd=tmp_path)
    assert result.returncode == 0
    for command in ("ppo", "sft", "score", "compare", "make-tiny-model", "make-data", "train-reward"):
        assert f"  {command} " in result.stdout, command


@pytest.mark.parametrize("command", ["make-tiny-model", "make-data"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert f"vlm-rl {command}" in out and "out_dir" in out and "--seed" in out


def test_unknown_command(tmp_path):
    result = vlm_rl("make-modle", "x", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown command 'make-modle'" in result.stderr and "make-tiny-model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_console_script_is_installed(tmp_path):
    script = shutil.which("vlm-rl", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("console script not installed in this environment")
    result = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "make-data" in result.stdout


@pytest.mark.parametrize("command", ["make-data", "make-tiny-model"])
def test_a_user_file_survives_and_overwrite_replaces(tmp_path, command, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # in-process (the subprocess path is test_make_tiny_model's): "project" is relative
    out = tmp_path / "project"
    out.mkdir()
    (out / "thesis.tex").write_text("two years of work")
    extra = ["--n", "10"] if command == "make-data" else []
    refused = user_error(capsys, [command, "project", *extra])
    assert f"vlm-rl {command}: error: project is not empty" in refused and "--overwrite" in refused
    assert [p.name for p in tmp_path.iterdir()] == ["project"] and (out / "thesis.tex").read_text() == "two years of work"

    cli_main([command, "project", *extra, "--overwrite"])
    assert not (out / "thesis.tex").exists() and (out / ("train.jsonl" if command == "make-data" else "config.json")).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["project"]  # nothing left aside
