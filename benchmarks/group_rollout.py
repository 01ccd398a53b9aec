"""A group costs one prompt: a GRPO iteration with `num_generations` G, each distinct prompt processed, encoded and
prefilled once (`share_prompts`, the default) vs every sample on its own (`share_prompts: false`, the path before).

On a random-weight Qwen2-VL with Qwen2-VL-2B's vision-tower / language-model proportions (`--size cpu`, the default;
benchmarks/_common.py), one 448 x 448 image per prompt (256 vision tokens), prompts of ~100 text tokens. Two
PPOTrainers that differ only in `share_prompts` run the same GRPO iterations from the same seeds (full fine-tuning,
frozen tower, reference copy, vision features reused in both), alternately, so that load from elsewhere on the
machine hits both alike; the fastest timed iteration of each counts. Reported: the whole iteration and the rollout
phase alone (prompt encoding, vision tower, generate), the vision tower's runs and images per iteration.

    python benchmarks/group_rollout.py [--generations 8] [--prompts 1] [--json PATH]
    python benchmarks/group_rollout.py --size 2b --device cuda --bf16 --prompts 8   # on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import SIZES, add_machine_arguments, make_sized_model, ppo_trainer, prepare, synthetic_samples, write_json


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_tower(trainer) -> dict:
    """Calls of the policy's and the reference's vision towers, and the images they encoded, while the dict lives."""
    from vlm_rl.models.vision_features import vision_tower

    counts = {"calls": 0, "images": 0}

    def hook(module, args, kwargs):
        counts["calls"] += 1
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counts["images"] += 0 if grid is None else grid.shape[0]

    for model in (trainer.model.policy, trainer.ref_model):
        vision_tower(model).register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--generations", type=int, default=8, help="num_generations G")
    parser.add_argument("--prompts", type=int, default=1, help="distinct prompts per iteration")
    parser.add_argument("--response", type=int, default=64, help="max new tokens")
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1, help="num_ppo_epochs (GRPO recipes: 1)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations each way, after one warm-up")
    add_machine_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from transformers import AutoProcessor

    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_sized_model(root / "model", args.size)
    batch = args.prompts * args.generations
    samples = synthetic_samples(root, args.prompts * (args.iterations + 1), args.text_tokens, AutoProcessor.from_pretrained(model_dir))
    grpo = dict(advantage_estimator="grpo", num_generations=args.generations, total_episodes=batch * (args.iterations + 1), kl_coef=0.05)
    trainers, counts = {}, {}
    for share in (True, False):
        trainer = ppo_trainer(model_dir, root / f"run-{share}", samples, batch, args.response, args.epochs, device.type, args.bf16,
                              share_prompts=share, **grpo)
        trainers[share] = prepare(trainer)
        counts[share] = count_tower(trainer)
    times = {share: {"iteration": [], "rollout": []} for share in trainers}
    tower = {}
    for i in range(args.iterations + 1):  # the first is a warm-up
        for share, trainer in trainers.items():
            counts[share].update(calls=0, images=0)
            rollout_seconds = []
            make_rollout = trainer.make_rollout

            def timed_rollout(*a, **kw):
                start = time.perf_counter()
                out = make_rollout(*a, **kw)
                synchronise(device)
                rollout_seconds.append(time.perf_counter() - start)
                return out

            trainer.make_rollout = timed_rollout
            torch.manual_seed(i)
            start = time.perf_counter()
            trainer.iteration(i)
            synchronise(device)
            seconds = time.perf_counter() - start
            del trainer.make_rollout
            tower[share] = dict(counts[share])
            if i:
                times[share]["iteration"].append(seconds)
                times[share]["rollout"].append(rollout_seconds[0])
    best = {share: {phase: min(t) for phase, t in phases.items()} for share, phases in times.items()}
    iteration_speedup = best[False]["iteration"] / best[True]["iteration"]
    rollout_speedup = best[False]["rollout"] / best[True]["rollout"]
    print(f"GRPO on Qwen2-VL size {args.size!r} {SIZES[args.size]}, {device}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.threads} thread(s)")
    print(f"  {args.prompts} prompt(s) x G = {args.generations} samples: 448x448 image (256 vision tokens) + ~{args.text_tokens} "
          f"text tokens, up to {args.response} new tokens, {args.epochs} epoch(s), reference copy; fastest of {args.iterations}")
    print(f"  {'':<40}{'iteration s':>12}{'rollout s':>11}{'tower runs':>12}{'images':>8}")
    for share, name in ((False, "every sample on its own (before)"), (True, "one prompt per group (share_prompts)")):
        print(f"  {name:<40}{best[share]['iteration']:>12.2f}{best[share]['rollout']:>11.2f}{tower[share]['calls']:>12d}{tower[share]['images']:>8d}")
    print(f"  speed-up: iteration {iteration_speedup:.2f}x, rollout phase {rollout_speedup:.2f}x")
    write_json(args.json, {
        "group_iteration_speedup": round(iteration_speedup, 3), "group_rollout_speedup": round(rollout_speedup, 3),
        "seconds": {("shared" if share else "per_sample"): {k: round(v, 3) for k, v in b.items()} for share, b in best.items()},
        "tower_per_iteration": {("shared" if share else "per_sample"): tower[share] for share in tower},
        "generations": args.generations, "prompts": args.prompts, "size": args.size, "device": str(device), "bf16": args.bf16,
    })


if __name__ == "__main__":
    main()
