"""Score existing responses offline. `python scripts/score.py --data IN --reward SPEC [--reward SPEC2] --out OUT.jsonl`"""

import sys

from vlm_rl.errors import run_command
from vlm_rl.evaluation.score import main

if __name__ == "__main__":
    run_command("score", main, sys.argv[1:])  # a user error: one line and exit status 2 (--debug: traceback)
