"""Where a PPO run's time goes: each phase of `PPOTrainer.train()` timed in place (exclusive of the phases inside
it), and the share spent outside model compute (generate, vision encoding, scoring forwards, optimisation).

On the random-weight Qwen2-VL with Qwen2-VL-2B's proportions (`benchmarks/_common.py`, 448 x 448 images of 256
vision tokens), full fine-tuning with its reference copy, a rule reward, logging every iteration and a checkpoint
every `--save-steps` iterations (plus the final save), as `vlm-rl ppo` runs.

    python benchmarks/ppo_phases.py [--iterations 4] [--save-steps 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import SIZES, add_machine_arguments, make_sized_model, ppo_trainer, synthetic_samples, write_json

# (table row, is model compute, the timed calls it sums: "parent/child" paths of exclusive time)
PHASES = [
    ("prompt encoding (processor)", False, ["make_rollout/encode_prompts"]),
    ("vision encoding (once per rollout)", True, ["make_rollout/encode_images"]),
    ("generate", True, ["make_rollout/generate_responses"]),
    ("rollout bookkeeping", False, ["make_rollout"]),
    ("scoring forwards (old policy, value, reference)", True, ["score/policy_forward", "score/reference_logprobs"]),
    ("reward (decode + rule reward)", False, ["score", "score/reward"]),
    ("advantages (KL, GAE, whitening)", False, ["advantages"]),
    ("optimisation (forward, backward, step)", True, ["optimise", "optimise/policy_forward"]),
    ("metrics and logging", False, ["metrics", "log"]),
    ("checkpointing (every save + final)", False, ["save_checkpoint", "save_final"]),
    ("set-up, loop, LR schedule", False, ["train", "iteration"]),
]


class Profiler:
    """Exclusive wall time per call path ("parent/child"): a call's time minus that of the timed calls inside it."""

    def __init__(self):
        self.exclusive = defaultdict(float)
        self.stack: list[list] = []  # [name, start, time spent in children]

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            parent = self.stack[-1][0] if self.stack else None
            path = f"{parent}/{name}" if parent in ("make_rollout", "score", "optimise") else name
            self.stack.append([path, time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                path, start, children = self.stack.pop()
                spent = time.perf_counter() - start
                self.exclusive[path] += spent - children
                if self.stack:
                    self.stack[-1][2] += spent

        setattr(owner, attr, timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    add_machine_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import vlm_rl.training.trainer as trainer_module
    from transformers import AutoProcessor
    from vlm_rl.models.critic import PolicyAndValue

    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_sized_model(root / "model", args.size)
    samples = synthetic_samples(root, args.batch * args.iterations, 100, AutoProcessor.from_pretrained(model_dir))
    trainer = ppo_trainer(model_dir, root, samples, args.batch, args.response, args.epochs, args.device, args.bf16,
                          total_episodes=args.batch * args.iterations, save_steps=args.save_steps, logging_steps=1)
    profiler = Profiler()
    profiler.wrap(trainer_module, "encode_prompts", "encode_prompts")
    profiler.wrap(trainer_module, "generate_responses", "generate_responses")
    profiler.wrap(PolicyAndValue, "forward", "policy_forward")
    profiler.wrap(trainer.reward, "score", "reward")
    for method in ("encode_images", "make_rollout", "score", "reference_logprobs", "advantages", "optimise", "metrics",
                   "log", "save_checkpoint", "save_final", "iteration", "train"):
        profiler.wrap(trainer, method, method)
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own console lines
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start

    times = profiler.exclusive
    rows = [(name, model, sum(times.get(p, 0.0) for p in paths)) for name, model, paths in PHASES]
    accounted = sum(t for _, _, t in rows)
    assert abs(accounted - total) < 0.05 * total, (accounted, total, dict(times))
    print(f"PPO on Qwen2-VL size {args.size!r}, {args.device}: {args.iterations} iterations of {args.batch} prompts "
          f"(448x448 images, ~100 text tokens), up to {args.response} new tokens, {args.epochs} PPO epochs, "
          f"checkpoint every {args.save_steps}; {trainer.sharing.describe()}")
    print(f"  {'phase':<50}{'seconds':>9}{'share':>8}  model compute")
    for name, model, seconds in rows:
        print(f"  {name:<50}{seconds:>9.2f}{seconds / total:>8.1%}  {'yes' if model else ''}")
    outside = sum(t for _, model, t in rows if not model)
    print(f"  {'total (train() wall time)':<50}{total:>9.2f}")
    print(f"  outside model compute: {outside:.2f} s = {outside / total:.1%} of the run")
    write_json(args.json, {
        "outside_model_share": round(outside / total, 4), "seconds": {name: round(t, 3) for name, _, t in rows},
        "total_seconds": round(total, 3), "iterations": args.iterations, "size": args.size, "device": args.device,
    })


if __name__ == "__main__":
    main()
