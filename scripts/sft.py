"""Supervised fine-tuning of a Qwen2-VL on image + question -> answer demonstrations (TRL's SFTTrainer).

    accelerate launch scripts/sft.py --config configs/sft_tiny.yaml
    accelerate launch scripts/sft.py --model_name_or_path DIR --train_data data/shapes/train.jsonl \
        --output_dir out/sft --max_steps 50 [--use_peft --lora_r 16]

Every `SFTConfig` / `TrainingArguments` flag works too; command-line flags override the YAML. Same as `vlm-rl sft`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm_rl.errors import run_command  # noqa: E402
from vlm_rl.sft import main  # noqa: E402

if __name__ == "__main__":
    run_command("sft", main, sys.argv[1:])  # a user error: one line and exit status 2 (--debug: traceback)
