"""The README's quick start, read from the README itself and run as written on the tiny model (in-process), with only
what a 2-core CPU needs added: `--use_cpu true` and a few steps instead of thousands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from vlm_rl.cli import main as cli_main
from vlm_rl.ppo import main as ppo_main
from vlm_rl.sft import main as sft_main
from vlm_rl.data.synthetic import make_synthetic_data

REPO = Path(__file__).resolve().parents[1]
CPU_AND_SHORT = {
    "scripts/sft.py": ["--use_cpu", "true", "--max_steps", "2", "--report_to", "none"],
    "scripts/ppo.py": ["--use_cpu", "true", "--total_episodes", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                       "--num_mini_batches", "1", "--max_new_tokens", "3", "--report_to", "none"],
    "compare": ["--max-samples", "4", "--max-new-tokens", "3"],
}  # fmt: skip


def quick_start_commands() -> list[list[str]]:
    """The commands of the README's quick-start block, each as argv."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start on your own model\n+```bash\n(.*?)```", readme, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_quick_start_runs_as_written(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its relative paths (data/, runs/, reports/) land here
    make_synthetic_data(tmp_path / "data", n=24, seed=0)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    commands = quick_start_commands()
    assert [c[:3] for c in commands] == [["accelerate", "launch", "scripts/sft.py"], ["accelerate", "launch", "scripts/ppo.py"], ["vlm-rl", "compare", "--model"]]
    for argv in commands:
        argv = [str(tiny_model_dir) if a == "/models/Qwen2-VL-2B-Instruct" else a for a in argv]
        if argv[:2] == ["accelerate", "launch"]:  # one process: the script's main, in-process
            script, args = argv[2], argv[3:]
            {"scripts/sft.py": sft_main, "scripts/ppo.py": ppo_main}[script](args + CPU_AND_SHORT[script])
        else:
            cli_main(argv[1:] + CPU_AND_SHORT["compare"])
    assert (tmp_path / "runs" / "sft" / "adapter_config.json").exists()
    assert (tmp_path / "runs" / "ppo-qwen2vl-2b-lora" / "adapter_config.json").exists()
    assert (tmp_path / "reports" / "sft-vs-rl" / "report.html").exists()
