"""A launch that asked for more processes than it started says so (vlm_rl/launch.py). What `accelerate launch` exports
is taken from accelerate's own launcher code, and one real launch shows the warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_rl.launch import fewer_processes_than_asked, process_index

REPO = Path(__file__).resolve().parents[1]


def simple_launcher_environment(*flags: str) -> dict[str, str]:
    """The environment accelerate's simple launcher gives the script for `accelerate launch FLAGS script.py`."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args([*flags, "--mixed_precision", "no", "--dynamo_backend", "no", "script.py"])
    args = _validate_launch_command(args)[0]
    assert not args.multi_gpu  # the launcher that runs one process
    return prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("flags", [("--cpu", "--num_processes", "2"), ("--num_processes", "2")])
def test_several_processes_asked_one_started_is_said(monkeypatch, flags):
    for name in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    warning = fewer_processes_than_asked(simple_launcher_environment(*flags))
    assert warning is not None and "--multi_gpu" in warning and "use_cpu: true" in warning


def test_one_process_asked_or_several_started_is_fine(monkeypatch):
    for name in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert fewer_processes_than_asked(simple_launcher_environment("--cpu", "--num_processes", "1")) is None
    # torchrun (--multi_gpu) gives every worker its rank and the world size
    torchrun = {**simple_launcher_environment("--cpu", "--num_processes", "2"), "WORLD_SIZE": "2", "RANK": "1"}
    assert fewer_processes_than_asked(torchrun) is None and process_index(torchrun) == 1
    assert fewer_processes_than_asked({}) is None and process_index({}) == 0  # plain python


def test_a_real_launch_of_two_cpu_processes_without_multi_gpu_warns(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for name in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/ppo.py", "--help"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vlm-rl ppo: warning: accelerate launch was asked for more than one process but started this one alone" in result.stderr
