"""What the reference model costs per PPO iteration: `kl_coef` 0.05 (a KL term: the frozen reference copy loaded and
run over every rollout) vs `kl_coef` 0 (TRL's `beta` 0: no reference loaded, run or saved), the same model, batch and
estimator (the memory in a fresh process each, the time alternating in one).

On the random-weight Qwen2-VL with Qwen2-VL-2B's proportions (`--size cpu`, `benchmarks/_common.py`; 448 x 448
images of 256 vision tokens, ~100 text tokens), full fine-tuning (fp32 weights, frozen vision tower), grpo with 4
samples per prompt, one PPO epoch. Measured: the peak resident memory (VmHWM) over the process's memory before the
models load, from loading through two iterations, in a fresh process per setting; and the median wall time of an
iteration with and without the KL term, alternating in one process (so that both see the same machine load), the
fastest of each, and the reference forward's own time in the iterations with it.

    python benchmarks/reference_cost.py [--size cpu] [--batch 8] [--iterations 3] [--json PATH]
    python benchmarks/reference_cost.py --size 2b --device cuda --bf16       # on a GPU: torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import SIZES, in_subprocess, make_sized_model, peak_rss_mib, ppo_trainer, prepare, rss_mib, synthetic_samples, write_json

KL_COEF = {"with_reference": 0.05, "without_reference": 0.0}


def trainer_for(args, kl_coef: float):
    from transformers import AutoProcessor

    samples = synthetic_samples(Path(tempfile.mkdtemp(prefix="vlm-rl-bench-")), args.batch * args.iterations, 100,
                                AutoProcessor.from_pretrained(args.model_dir))
    return prepare(ppo_trainer(
        Path(args.model_dir), Path(tempfile.mkdtemp(prefix="vlm-rl-bench-")), samples, args.batch, args.response, 1, args.device, args.bf16,
        kl_coef=kl_coef, advantage_estimator="grpo", num_generations=4, kl_in_loss=True,
    ))  # fmt: skip


def measure_memory(args) -> dict:
    """Two PPO iterations with `KL_COEF[args.measure]` in this process: peak memory over the baseline, weights held."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    trainer = trainer_for(args, KL_COEF[args.measure])
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**20
    torch.manual_seed(0)
    for i in range(2):
        trainer.iteration(i)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    return {"peak_mib": peak - baseline, "weights_mib": weights, "reference_loaded": trainer.ref_model is not None}


def measure_time(args) -> dict:
    """Seconds per iteration with and without the KL term, in one process on one trainer (its reference loaded),
    alternating kl_coef 0.05 and 0 iteration by iteration after a warm-up one, the fastest of each (the machine's
    other load only ever adds time); and the reference forward's own seconds in the iterations with it. With kl_coef
    0 the trainer runs neither the reference forward nor the KL; the rest is the same work (the learning rate is
    1e-6: the policy, hence the rollouts' lengths, barely move)."""
    cuda = args.device.startswith("cuda")
    trainer = trainer_for(args, KL_COEF["with_reference"])
    in_reference = []
    original = trainer.reference_logprobs

    def timed_reference(mb):
        start = time.perf_counter()
        try:
            return original(mb)
        finally:
            in_reference[-1] += time.perf_counter() - start

    trainer.reference_logprobs = timed_reference
    seconds = {variant: [] for variant in KL_COEF}
    torch.manual_seed(0)
    in_reference.append(0.0)
    trainer.iteration(0)  # warm-up
    for i in range(1, 2 * args.iterations + 1):
        variant = "with_reference" if i % 2 else "without_reference"
        trainer.args.kl_coef = KL_COEF[variant]
        in_reference.append(0.0)
        start = time.perf_counter()
        trainer.iteration(i)
        if cuda:
            torch.cuda.synchronize()
        seconds[variant].append(time.perf_counter() - start)
    with_reference = [t for t in in_reference[1:] if t > 0]
    return {**{variant: min(times) for variant, times in seconds.items()}, "reference_forward": min(with_reference)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="samples per iteration (prompts x 4 generations)")
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure", choices=[*KL_COEF, "time"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_time(args) if args.measure == "time" else measure_memory(args)))
        return
    model_dir = make_sized_model(Path(tempfile.mkdtemp(prefix="vlm-rl-bench-")) / "model", args.size)
    common = ["--size", args.size, "--batch", str(args.batch), "--response", str(args.response), "--iterations", str(args.iterations),
              "--device", args.device, "--threads", str(args.threads), "--model-dir", str(model_dir)] + (["--bf16"] if args.bf16 else [])
    memory = {variant: in_subprocess("reference_cost.py", "--measure", variant, *common) for variant in KL_COEF}
    seconds = in_subprocess("reference_cost.py", "--measure", "time", *common)
    print(f"PPO (grpo, 4 samples per prompt) on Qwen2-VL size {args.size!r}, {args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}: "
          f"{args.batch} samples per iteration (448x448 images, ~100 text tokens), up to {args.response} new tokens, one PPO epoch")
    print(f"  {'':<36}{'peak MiB':>10}{'weights MiB':>13}{'s / iteration':>15}")
    for variant, r in memory.items():
        label = f"kl_coef {KL_COEF[variant]} ({'reference' if r['reference_loaded'] else 'no reference'})"
        print(f"  {label:<36}{r['peak_mib']:>10,.0f}{r['weights_mib']:>13,.0f}{seconds[variant]:>15.2f}")
    with_ref, without = memory["with_reference"], memory["without_reference"]
    memory_ratio = without["peak_mib"] / with_ref["peak_mib"]
    time_ratio = seconds["without_reference"] / seconds["with_reference"]
    print(f"  kl_coef 0 / kl_coef 0.05: peak memory {memory_ratio:.2f} ({with_ref['peak_mib'] - without['peak_mib']:,.0f} MiB saved), "
          f"time per iteration {time_ratio:.2f} ({seconds['with_reference'] - seconds['without_reference']:.2f} s saved; "
          f"fastest of {args.iterations} iterations each, alternating in one process)")
    share = seconds["reference_forward"] / seconds["with_reference"]
    print(f"  the reference forward itself: {seconds['reference_forward']:.2f} s per iteration (fastest), {share:.1%} of the "
          "fastest iteration with it: the time kl_coef 0 saves")
    write_json(args.json, {
        "memory_ratio_without_reference": round(memory_ratio, 3), "time_ratio_without_reference": round(time_ratio, 3),
        "peak_mib": {k: round(r["peak_mib"], 1) for k, r in memory.items()},
        "weights_mib": {k: round(r["weights_mib"], 1) for k, r in memory.items()},
        "seconds_per_iteration": {k: round(v, 3) for k, v in seconds.items() if k in KL_COEF},
        "reference_forward_seconds": round(seconds["reference_forward"], 3), "reference_forward_share": round(share, 4),
        "size": args.size, "batch": args.batch, "response": args.response, "device": args.device, "bf16": args.bf16,
    })


if __name__ == "__main__":
    main()
