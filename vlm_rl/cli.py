"""`vlm-rl COMMAND ...`: one entry point for every job; each command's own --help lists its flags."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlm_rl.errors import DEBUG_FLAG, run_command

# command -> (module with main(argv), one-line help)
COMMANDS = {
    "demo": ("vlm_rl.demo", "make-tiny-model -> make-data -> SFT -> PPO -> compare, on CPU, offline"),
    "ppo": ("vlm_rl.ppo", "PPO-train a Qwen2-VL policy (flags: PPOConfig; --config YAML)"),
    "sft": ("vlm_rl.sft", "supervised fine-tuning with TRL's SFTTrainer (the checkpoint PPO starts from)"),
    "score": ("vlm_rl.evaluation.score", "score existing responses offline with one or more rewards"),
    "compare": ("vlm_rl.evaluation.compare", "compare checkpoints on the same prompts; writes summary.json and report.html"),
    "train-reward": ("reward_models.train_reward", "train a Qwen2-VL reward model (Bradley-Terry) on preference pairs"),
    "serve-reward": ("reward_models.server", "serve any reward over HTTP on loopback"),
    "make-tiny-model": ("vlm_rl.cli", "write an embedded tiny VLM (model + processor; --family qwen2_vl|qwen2_5_vl|qwen3_vl|llava) to a directory"),
    "generate": ("vlm_rl.evaluation.generate", "answer prompts with any checkpoint; writes JSONL that score reads"),
    "make-data": ("vlm_rl.cli", "write the synthetic shapes VQA dataset (train/test JSONL + preference pairs; --tasks motion,appear: clips)"),
    "validate-data": ("vlm_rl.data.validate", "check every row of a dataset for a task; list every problem by file, line and field"),
}
OVERWRITE_HELP = "replace a non-empty out_dir whole (default: refuse it; nothing in it is touched)"


def make_tiny_model_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vlm-rl make-tiny-model", description=COMMANDS["make-tiny-model"][1])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    from vlm_rl.models.families import FAMILIES

    parser.add_argument("--family", default="qwen2_vl", choices=list(FAMILIES), help="model family (default: qwen2_vl)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    from vlm_rl.models.tiny import make_tiny_model

    path = make_tiny_model(args.out_dir, seed=args.seed, family=args.family, overwrite=args.overwrite)
    print(f"tiny {FAMILIES[args.family].title} written to {path}")


def make_data_main(argv: list[str]) -> None:
    from vlm_rl.data.synthetic import IMAGE_TASKS, TASKS

    parser = argparse.ArgumentParser(prog="vlm-rl make-data", description=COMMANDS["make-data"][1])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=400, help="rows in all (train + test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of wrong demonstrations in train's 'response' (zoom: of "
                        "sft.jsonl's demonstrations that guess instead of calling the tool)")
    parser.add_argument(
        "--tasks", type=lambda v: [t for t in v.split(",") if t], action="extend", default=None,
        help=f"question kinds, comma- or space-separated (default: {','.join(IMAGE_TASKS)}); the video tasks motion and appear "
        "write short clips (mp4, and frame directories in *_frames.jsonl); zoom (alone): questions only the zoom tool answers, "
        "with tool-use demonstrations (vlm_rl/data/zoom_task.py)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks or () if t not in (*TASKS, "zoom")]
    if unknown:
        parser.error(f"argument --tasks: invalid choice: {', '.join(unknown)} (choose from {', '.join(TASKS)}, zoom)")
    from vlm_rl.data.synthetic import make_synthetic_data
    from vlm_rl.data.zoom_task import make_zoom_data

    if "zoom" in (args.tasks or ()) and len(args.tasks) > 1:
        parser.error("--tasks zoom makes its own dataset (scenes, questions, tool-use demonstrations): give it alone")
    try:
        if args.tasks == ["zoom"]:
            path = make_zoom_data(args.out_dir, n=args.n, seed=args.seed, test_fraction=args.test_fraction, noise=args.noise, overwrite=args.overwrite)
        else:
            path = make_synthetic_data(
                args.out_dir, n=args.n, seed=args.seed, test_fraction=args.test_fraction, noise=args.noise, tasks=args.tasks,
                overwrite=args.overwrite,
            )
    except ValueError as e:  # a bad --n/--noise/--test-fraction: a usage error, not a traceback
        parser.error(str(e))
    print(f"synthetic data written to {path}")


LOCAL_MAINS = {"make-tiny-model": make_tiny_model_main, "make-data": make_data_main}


def main(argv: list[str] | None = None) -> None:
    """`vlm-rl COMMAND ARGS`: a user error in any command is one line on stderr and exit status 2 (see errors.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = [DEBUG_FLAG] if DEBUG_FLAG in argv else []
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: vlm-rl COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        print("\n`vlm-rl COMMAND --help` lists a command's flags; add --debug (or set VLM_RL_DEBUG=1) to see the traceback of an error.")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"vlm-rl: unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if command in LOCAL_MAINS:
        run_command(command, LOCAL_MAINS[command], rest + debug)
        return
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"vlm-rl {command}", *rest]
    run_command(command, module.main, rest + debug)


if __name__ == "__main__":
    main()
