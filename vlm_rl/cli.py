"""`vlm-rl COMMAND ...`: one entry point for every job; each command's own --help lists its flags."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module with main(argv), one-line help)
COMMANDS = {
    "demo": ("vlm_rl.demo", "make-tiny-model -> make-data -> SFT -> PPO -> compare, on CPU, offline"),
    "ppo": ("vlm_rl.ppo", "PPO-train a Qwen2-VL policy (flags: PPOConfig; --config YAML)"),
    "sft": ("vlm_rl.sft", "supervised fine-tuning with TRL's SFTTrainer (the checkpoint PPO starts from)"),
    "score": ("vlm_rl.score", "score existing responses offline with one or more rewards"),
    "compare": ("vlm_rl.compare", "compare checkpoints on the same prompts; writes summary.json and report.html"),
    "train-reward": ("reward_models.train_reward", "train a Qwen2-VL reward model (Bradley-Terry) on preference pairs"),
    "serve-reward": ("reward_models.server", "serve any reward over HTTP on loopback"),
    "make-tiny-model": ("vlm_rl.cli", "write the embedded tiny Qwen2-VL (model + processor) to a directory"),
    "generate": ("vlm_rl.generate", "answer prompts with any checkpoint; writes JSONL that score reads"),
    "make-data": ("vlm_rl.cli", "write the synthetic shapes VQA dataset (train/test JSONL + preference pairs)"),
}


def make_tiny_model_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vlm-rl make-tiny-model", description=COMMANDS["make-tiny-model"][1])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from vlm_rl.tiny import make_tiny_model

    path = make_tiny_model(args.out_dir, seed=args.seed)
    print(f"tiny Qwen2-VL written to {path}")


def make_data_main(argv: list[str]) -> None:
    from vlm_rl.synthetic_data import TASKS

    parser = argparse.ArgumentParser(prog="vlm-rl make-data", description=COMMANDS["make-data"][1])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=400, help="rows in all (train + test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of wrong demonstrations in train's 'response'")
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    args = parser.parse_args(argv)
    from vlm_rl.synthetic_data import make_synthetic_data

    try:
        path = make_synthetic_data(args.out_dir, n=args.n, seed=args.seed, test_fraction=args.test_fraction, noise=args.noise, tasks=args.tasks)
    except ValueError as e:  # a bad --n/--noise/--test-fraction: a usage error, not a traceback
        parser.error(str(e))
    print(f"synthetic data written to {path}")


LOCAL_MAINS = {"make-tiny-model": make_tiny_model_main, "make-data": make_data_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: vlm-rl COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        print("\n`vlm-rl COMMAND --help` lists a command's flags.")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"vlm-rl: unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if command in LOCAL_MAINS:
        LOCAL_MAINS[command](rest)
        return
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"vlm-rl {command}", *rest]
    module.main(rest)


if __name__ == "__main__":
    main()
