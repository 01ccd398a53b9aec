"""A group costs one prompt: a GRPO iteration with `num_generations` G, each distinct prompt processed, encoded and
prefilled once (`share_prompts`, the default) vs every sample on its own (`share_prompts: false`, the path before).

On a random-weight Qwen2-VL with Qwen2-VL-2B's vision-tower / language-model proportions (`--size cpu`, the default;
benchmarks/_common.py), one 448 x 448 image per prompt (256 vision tokens), prompts of ~100 text tokens. Two
PPOTrainers that differ only in `share_prompts` run the same GRPO iterations from the same seeds (full fine-tuning,
frozen tower, reference copy, vision features reused in both), alternately, so that load from elsewhere on the
machine hits both alike; the fastest timed iteration of each counts. Reported: the whole iteration and the rollout
phase alone (prompt encoding, vision tower, generate), in wall seconds and in CPU seconds of this process (on a
machine other processes load, those of a one-thread run follow the work done), and the vision tower's runs and
images per iteration.

    python benchmarks/group_rollout.py [--generations 8] [--prompts 1] [--json PATH]
    python benchmarks/group_rollout.py --size 2b --device cuda --bf16 --prompts 8   # on a GPU
"""

from __future__ import annotations

import argparse

import torch
from _common import SIZES, add_machine_arguments, machine, ppo_trainer, prepare, sized_model_and_prompts, timed, write_json


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
    device = machine(args)
    batch = args.prompts * args.generations
    root, model_dir, samples = sized_model_and_prompts(args.size, args.prompts * (args.iterations + 1), args.text_tokens)
    grpo = dict(advantage_estimator="grpo", num_generations=args.generations, total_episodes=batch * (args.iterations + 1), kl_coef=0.05)
    trainers, counts = {}, {}
    for share in (True, False):
        trainer = ppo_trainer(model_dir, root / f"run-{share}", samples, batch, args.response, args.epochs, device.type, args.bf16,
                              share_prompts=share, **grpo)
        trainers[share] = prepare(trainer)
        counts[share] = count_tower(trainer)
    times = {share: {"iteration": [], "rollout": []} for share in trainers}  # (wall, CPU) seconds per timed iteration
    tower = {}
    for i in range(args.iterations + 1):  # the first is a warm-up
        for share, trainer in trainers.items():
            counts[share].update(calls=0, images=0)
            rollout_seconds = []
            make_rollout = trainer.make_rollout

            def timed_rollout(*a, **kw):
                out, wall, cpu = timed(make_rollout, *a, **kw)
                rollout_seconds.append((wall, cpu))
                return out

            trainer.make_rollout = timed_rollout
            torch.manual_seed(i)
            _, *seconds = timed(trainer.iteration, i)
            del trainer.make_rollout
            tower[share] = dict(counts[share])
            if i:
                times[share]["iteration"].append(seconds)
                times[share]["rollout"].append(rollout_seconds[0])
    best = {share: {phase: min(t) for phase, t in phases.items()} for share, phases in times.items()}
    speedup = {phase: [best[False][phase][k] / best[True][phase][k] for k in (0, 1)] for phase in ("iteration", "rollout")}
    print(f"GRPO on Qwen2-VL size {args.size!r} {SIZES[args.size]}, {device}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.threads} thread(s)")
    print(f"  {args.prompts} prompt(s) x G = {args.generations} samples: 448x448 image (256 vision tokens) + ~{args.text_tokens} "
          f"text tokens, up to {args.response} new tokens, {args.epochs} epoch(s), reference copy; fastest of {args.iterations}")
    print(f"  {'':<40}{'iteration s':>12}{'(CPU s)':>9}{'rollout s':>11}{'(CPU s)':>9}{'tower runs':>12}{'images':>8}")
    for share, name in ((False, "every sample on its own (before)"), (True, "one prompt per group (share_prompts)")):
        (it_wall, it_cpu), (ro_wall, ro_cpu) = best[share]["iteration"], best[share]["rollout"]
        print(f"  {name:<40}{it_wall:>12.2f}{it_cpu:>9.2f}{ro_wall:>11.2f}{ro_cpu:>9.2f}{tower[share]['calls']:>12d}{tower[share]['images']:>8d}")
    print(f"  speed-up: iteration {speedup['iteration'][0]:.2f}x ({speedup['iteration'][1]:.2f}x CPU), "
          f"rollout phase {speedup['rollout'][0]:.2f}x ({speedup['rollout'][1]:.2f}x CPU)")
    write_json(args.json, {
        "group_iteration_speedup": round(speedup["iteration"][0], 3), "group_rollout_speedup": round(speedup["rollout"][0], 3),
        "group_iteration_speedup_cpu": round(speedup["iteration"][1], 3), "group_rollout_speedup_cpu": round(speedup["rollout"][1], 3),
        "seconds": {
            ("shared" if share else "per_sample"): {phase: {"wall": round(w, 3), "cpu": round(c, 3)} for phase, (w, c) in b.items()}
            for share, b in best.items()
        },
        "tower_per_iteration": {("shared" if share else "per_sample"): tower[share] for share in tower},
        "generations": args.generations, "prompts": args.prompts, "size": args.size, "device": str(device), "bf16": args.bf16,
    })

if __name__ == "__main__":
    main()
