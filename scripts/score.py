"""Score existing responses offline. `python scripts/score.py --data IN --reward SPEC [--reward SPEC2] --out OUT.jsonl`"""

from vlm_rl.score import main

if __name__ == "__main__":
    main()
