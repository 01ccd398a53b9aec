"""PPO for Qwen2-VL. `accelerate launch scripts/ppo.py --config configs/ppo_tiny.yaml [--flag value ...]`"""

import sys

from vlm_rl.errors import run_command
from vlm_rl.ppo import main

if __name__ == "__main__":
    run_command("ppo", main, sys.argv[1:])  # a user error: one line and exit status 2 (--debug: traceback)
