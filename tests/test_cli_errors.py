"""Errors read like errors: a user error is one line `vlm-rl COMMAND: error: ...` and exit status 2 without a
traceback (with --debug or VLM_RL_DEBUG=1 the traceback); missing models say "not found"; an unreachable reward
server names its URL; a `module:callable` reward imports from the current directory; bare bool flags work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import user_error

from vlm_rl.cli import main as cli_main
from vlm_rl.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def occupied(tmp_path) -> Path:
    """A non-empty directory: `make-data` into it is a user error."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    return tmp_path / "d"


def test_a_user_error_is_one_line_and_exit_2(occupied, capsys, monkeypatch):
    monkeypatch.delenv("VLM_RL_DEBUG", raising=False)
    err = user_error(capsys, ["make-data", str(occupied), "--n", "4"])
    assert err.startswith(f"vlm-rl make-data: error: {occupied} is not empty")


@pytest.mark.parametrize("how", ["flag first", "flag last", "env"])
def test_debug_shows_the_traceback(occupied, monkeypatch, how):
    argv = ["make-data", str(occupied), "--n", "4"]
    if how == "env":
        monkeypatch.setenv("VLM_RL_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if how == "flag first" else [*argv, "--debug"]
    with pytest.raises(UserError, match="is not empty"):  # not swallowed: Python prints its traceback
        cli_main(argv)


def test_debug_in_a_subprocess_prints_the_traceback(occupied):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLM_RL_DEBUG", None)
    run = [sys.executable, "-m", "vlm_rl.cli", "make-data", str(occupied), "--n", "4"]
    quiet = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    loud = subprocess.run([*run, "--debug"], env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "error: " in quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "OutputExistsError" in loud.stderr


@pytest.mark.parametrize("command", ["sft", "ppo", "train-reward"])
@pytest.mark.parametrize("model", ["./no-such-model", "{tmp}/no-such-model"])
def test_a_missing_model_directory_is_not_found(tmp_path, capsys, synthetic_data_dir, command, model):
    model = model.format(tmp=tmp_path)
    data = synthetic_data_dir / ("preferences.jsonl" if command == "train-reward" else "train.jsonl")
    err = user_error(capsys, [command, "--model_name_or_path", model, "--train_data", str(data),
                              "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    assert err.startswith(f"vlm-rl {command}: error: model directory {model} not found"), err


def test_a_hub_id_offline_and_not_cached_is_not_found(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = user_error(capsys, ["sft", "--model_name_or_path", "no-org/no-model", "--output_dir", str(tmp_path / "out")])
    assert "model no-org/no-model not found" in err and "HF_HUB_OFFLINE" in err


def test_an_unreachable_reward_server_is_a_user_error_naming_the_url(capsys):
    from reward_models.remote import RemoteReward

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    reward = RemoteReward(url, retries=0, timeout=2)
    with pytest.raises(UserError, match=f"reward server {url} is unreachable"):
        reward([None], ["red"])


def test_a_module_callable_reward_imports_from_the_current_directory(tmp_path, monkeypatch):
    from reward_models.registry import load_reward

    (tmp_path / "cwd_reward_for_test.py").write_text("def brevity(prompts, completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    # As under the `vlm-rl` console script: the current directory is not on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    monkeypatch.delitem(sys.modules, "cwd_reward_for_test", raising=False)
    reward = load_reward("cwd_reward_for_test:brevity")
    assert reward(None, ["abc"]) == [0.25] and reward.name == "brevity"


def test_a_bare_bf16_flag_means_true(tmp_path):
    from vlm_rl.sft import parse_args

    assert parse_args(["--bf16", "--output_dir", str(tmp_path), "--use_cpu", "true"]).bf16 is True
    assert parse_args(["--bf16", "false", "--output_dir", str(tmp_path)]).bf16 is False
    assert parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"]).bf16 is False  # default: decided by hardware


def test_a_nonsense_train_reward_flag_is_a_user_error(capsys):
    err = user_error(capsys, ["train-reward", "--per_device_train_batch_size", "0"])
    assert "per_device_train_batch_size must be >= 1, got 0" in err


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--tools", "crop"], "tools: unknown tool 'crop'; use a built-in (zoom) or module:function"),
        (["--tools", "zoom", "--environment", "multi_turn_helpers:ZoomEveryTurn"], "tools and environment are exclusive"),
        (["--environment", "no_such_module:Env"], "environment: cannot import module 'no_such_module'"),
        (["--tools", "zoom", "--max_turns", "0"], "max_turns must be >= 1, got 0"),
    ],
)
def test_multi_turn_flags_that_cannot_work_are_one_line_before_any_model_loads(capsys, flags, says):
    err = user_error(capsys, ["ppo", "--model_name_or_path", "/nonexistent/model", *flags])
    assert says in err


@pytest.mark.parametrize(
    "body, says",
    [
        ("[float('nan')] + [1.0] * (len(completions) - 1)", "reward 'shaky' returned nan for sample 0; return None for samples it cannot score"),
        ("[1.0]", "reward 'shaky' returned 1 scores for 4 completions"),
    ],
)
def test_a_reward_returning_nan_or_too_few_scores_stops_ppo_in_one_line_naming_it(
    tmp_path, capsys, monkeypatch, tiny_model_dir, synthetic_data_dir, body, says
):
    module = f"shaky_reward_for_test_{abs(hash(body))}"  # one module per case: the first case's directory stays on sys.path
    (tmp_path / f"{module}.py").write_text(f"def shaky(prompts, completions, **kwargs):\n    return {body}\n")
    monkeypatch.chdir(tmp_path)
    err = user_error(capsys, [
        "ppo", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
        "--reward", f"{module}:shaky", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
        "--per_device_train_batch_size", "4", "--max_new_tokens", "2", "--max_steps", "1", "--report_to", "none",
    ])  # fmt: skip
    assert err == f"vlm-rl ppo: error: {says}"
