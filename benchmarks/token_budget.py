"""Micro-batches by tokens (`max_tokens_per_micro_batch`) vs micro-batches of a fixed number of samples, on a long
tail of response lengths.

On a random-weight Qwen2-VL with Qwen2-VL-2B's proportions (`--size cpu`, benchmarks/_common.py), one 448 x 448
image per prompt (256 vision tokens) and ~100 text tokens, responses of log-uniform lengths 8-512 tokens (drawn,
not generated: the forwards are what is timed). The scoring forwards (old policy + values, reference) and one PPO
epoch of training forwards and backwards over the same rollout, three ways, alternated, the fastest of
`--repeats` each:
  1. `--micro` samples per micro-batch, each padded to the rollout's longest response (the path before issue 25);
  2. `--micro` samples per micro-batch, each without the columns that are padding in all its rows (the default);
  3. by tokens: samples sorted by length fill micro-batches of at most `--micro` x (longest prompt + longest
     response) tokens, what a fixed micro-batch may hold at worst (the same peak activation memory).
`token_budget_speedup` is 1 over 3: micro-batches by tokens against fixed ones as they were; 2 over 3 (planning
alone, now that every micro-batch drops its own padding) is printed too. Wall and CPU seconds of this process are
both measured: on a machine other processes load, the CPU seconds of a one-thread run follow the work done.

    python benchmarks/token_budget.py [--batch 16] [--micro 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from _common import SIZES, add_machine_arguments, machine, ppo_trainer, prepare, sized_model_and_prompts, timed, write_json


def long_tail_responses(n: int, low: int, high: int, eos: int, vocab: range, seed: int = 0) -> torch.Tensor:
    """`n` responses of log-uniform lengths in [low, high], each ending with `eos`, right-padded with `eos`. (n, high)"""
    rng = random.Random(seed)
    responses = torch.full((n, high), eos)
    for row in range(n):
        length = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        responses[row, : length - 1] = torch.tensor([rng.choice(vocab) for _ in range(length - 1)])
    return responses


def rollout_for(trainer, samples: list[dict], responses: torch.Tensor):
    from vlm_rl.data.prompts import encode_prompts
    from vlm_rl.models.families import family_of
    from vlm_rl.rollout.batch import Rollout

    policy = trainer.model.policy
    query = encode_prompts(trainer.processor, samples)
    query = {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in query.items()}
    features = trainer.encode_images(policy, query)
    sources = [s["_source"] for s in samples]
    return Rollout.from_generation(query, responses.to(trainer.accelerator.device), trainer.eos_ids, trainer.pad_id, sources, family_of(policy), image_features=features)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--batch", type=int, default=16, help="samples in the rollout (one mini-batch)")
    parser.add_argument("--micro", type=int, default=4, help="samples per fixed micro-batch (scoring and training)")
    parser.add_argument("--shortest", type=int, default=8)
    parser.add_argument("--longest", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes each way, after one warm-up")
    add_machine_arguments(parser)
    args = parser.parse_args()
    device = machine(args)
    from vlm_rl.rollout.batch import Rollout
    from vlm_rl.rollout.micro_batches import micro_batch_tokens

    root, model_dir, samples = sized_model_and_prompts(args.size, args.batch, args.text_tokens)
    fixed = dict(per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.batch // args.micro,
                 local_rollout_forward_batch_size=args.micro, total_episodes=args.batch)
    first = prepare(ppo_trainer(model_dir, root / "fixed", samples, args.batch, args.longest, 1, device.type, args.bf16, **fixed))
    tokenizer = first.processor.tokenizer
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    responses = long_tail_responses(args.batch, args.shortest, args.longest, first.eos_ids[0], vocab)
    rollout = rollout_for(first, samples, responses)
    prompt = rollout.attention_mask[:, : rollout.context_length].sum(1)
    budget = args.micro * int(prompt.max() + rollout.response_lengths.max())
    planned = prepare(ppo_trainer(model_dir, root / "planned", samples, args.batch, args.longest, 1, device.type, args.bf16,
                                  max_tokens_per_micro_batch=budget, **fixed))
    trainers = {"before": first, "fixed": first, "tokens": planned}
    rollouts = {way: rollout if trainer is first else rollout_for(trainer, samples, responses) for way, trainer in trainers.items()}  # own features
    untrimmed = Rollout.trimmed
    lengths = rollout.row_lengths()
    plans, times = {}, {way: {"scoring": [], "training": []} for way in trainers}
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        for way, trainer in trainers.items():
            Rollout.trimmed = (lambda self: self) if way == "before" else untrimmed  # "before": every column computed
            seen = []
            planner = trainer.micro_batches
            trainer.micro_batches = lambda *a, planner=planner, seen=seen: seen.append(planner(*a)) or seen[-1]
            torch.manual_seed(repeat)
            scored, *scoring = timed(trainer.score, rollouts[way], samples)
            old = {**scored, **trainer.advantages(rollouts[way], scored)}
            _, *training = timed(trainer.optimise, rollouts[way], old)
            del trainer.micro_batches
            plans[way] = seen
            if repeat:
                times[way]["scoring"].append(scoring)
                times[way]["training"].append(training)
    Rollout.trimmed = untrimmed
    # per way: the fastest repeat's (wall, CPU) seconds of scoring and training
    best = {way: {phase: min(t) for phase, t in phases.items()} for way, phases in times.items()}
    total = {way: [b["scoring"][k] + b["training"][k] for k in (0, 1)] for way, b in best.items()}  # (wall, CPU)
    real = int(prompt.sum() + rollout.response_lengths.sum())
    width = rollout.context_length + rollout.response_mask.shape[1]
    computed = {
        "before": len(rollout) * width,
        **{way: sum(micro_batch_tokens(mb, lengths) for mb in plans[way][0]) for way in ("fixed", "tokens")},
    }  # tokens one scoring pass computes (prompts with their padding, responses with theirs)
    speedup = [total["before"][k] / total["tokens"][k] for k in (0, 1)]  # over the path before: the headline
    planning = [total["fixed"][k] / total["tokens"][k] for k in (0, 1)]  # over fixed micro-batches without their padding
    print(f"Qwen2-VL size {args.size!r}, {device}, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.threads} thread(s): "
          f"{args.batch} samples (448x448 image + ~{args.text_tokens} text tokens), responses {args.shortest}-{args.longest} "
          f"tokens log-uniform ({real:,} real tokens); scoring (policy + values, reference) + 1 epoch of training; "
          f"fastest of {args.repeats}")
    print(f"  {'':<48}{'micro-batches':>14}{'tokens':>9}{'scoring s':>11}{'training s':>12}{'total CPU s':>13}")
    rows = (("before", f"{args.micro} per micro-batch, padded to the longest"), ("fixed", f"{args.micro} per micro-batch, own padding"),
            ("tokens", f"by tokens, <= {budget:,} per micro-batch"))
    for way, name in rows:
        b = best[way]
        print(f"  {name:<48}{len(plans[way][0]):>14}{computed[way]:>9,}{b['scoring'][0]:>11.2f}{b['training'][0]:>12.2f}{total[way][1]:>13.2f}")
    print(f"  speed-up of micro-batches by tokens over fixed ones as before: {speedup[0]:.2f}x wall ({speedup[1]:.2f}x CPU); "
          f"over fixed ones without their own padding: {planning[0]:.2f}x wall ({planning[1]:.2f}x CPU)")
    write_json(args.json, {
        "token_budget_speedup": round(speedup[0], 3), "token_budget_speedup_cpu": round(speedup[1], 3),
        "over_fixed_without_padding": round(planning[0], 3), "over_fixed_without_padding_cpu": round(planning[1], 3),
        "seconds": {way: {phase: {"wall": round(w, 3), "cpu": round(c, 3)} for phase, (w, c) in b.items()} for way, b in best.items()},
        "tokens_per_scoring_pass": computed, "real_tokens": real, "budget": budget,
        "micro_batches": {way: len(plans[way][0]) for way in plans}, "batch": args.batch, "micro": args.micro,
        "size": args.size, "device": str(device), "bf16": args.bf16,
    })

if __name__ == "__main__":
    main()
