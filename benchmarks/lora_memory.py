"""Peak memory of one PPO iteration: full fine-tuning with its reference copy vs LoRA with the adapters-disabled
reference, the same model and batch, each in a fresh process.

The default model is a slice of Qwen2-VL-2B (`--size 2b-slice`: its widths, 2 vision and 2 language layers,
random weights): per layer, weights, gradients, AdamW state and activations weigh what they weigh in the 2B.
fp32 weights (CPU), frozen vision tower, LoRA r=16 on the language model's attention and MLP projections.
Measured: the process's peak resident memory (VmHWM) during model loading and the iteration (rollout, old-policy
and reference forwards, one PPO epoch with its optimiser step), over its resident memory before the models load.

    python benchmarks/lora_memory.py [--batch 4] [--json PATH]
    python benchmarks/lora_memory.py --size 2b --device cuda --bf16      # on a GPU: torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import SIZES, in_subprocess, make_sized_model, peak_rss_mib, ppo_trainer, prepare, rss_mib, synthetic_samples, write_json


def measure(args) -> dict:
    """One PPO iteration of `args.measure` ("full" or "lora") in this process: its peak memory over the baseline."""
    from transformers import AutoProcessor

    root = Path(args.model_dir).parent
    samples = synthetic_samples(Path(tempfile.mkdtemp(prefix="vlm-rl-bench-")), args.batch, 100, AutoProcessor.from_pretrained(args.model_dir))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    lora = dict(use_peft=True, lora_r=16, lora_alpha=32) if args.measure == "lora" else {}
    trainer = prepare(ppo_trainer(Path(args.model_dir), root / args.measure, samples, args.batch, args.response, 1, args.device, args.bf16, **lora))
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20
    if trainer.ref_model is not None:
        weights += sum(p.numel() * p.element_size() for p in trainer.ref_model.parameters()) / 2**20
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    torch.manual_seed(0)
    trainer.iteration(0)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    return {"peak_mib": peak - baseline, "weights_mib": weights, "trainable": trainable, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="2b-slice")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure", choices=["full", "lora"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    model_dir = make_sized_model(Path(tempfile.mkdtemp(prefix="vlm-rl-bench-")) / "model", args.size)
    common = ["--size", args.size, "--batch", str(args.batch), "--response", str(args.response), "--device", args.device,
              "--threads", str(args.threads), "--model-dir", str(model_dir)] + (["--bf16"] if args.bf16 else [])
    results = {variant: in_subprocess("lora_memory.py", "--measure", variant, *common) for variant in ("full", "lora")}
    print(f"One PPO iteration on Qwen2-VL size {args.size!r} ({SIZES[args.size]}), {args.device}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}: {args.batch} prompts (448x448 images, ~100 text tokens), "
          f"up to {args.response} new tokens, one PPO epoch")
    print(f"  {'':<44}{'peak MiB':>10}{'weights MiB':>13}{'trainable':>14}{'seconds':>9}")
    names = {"full": "full fine-tuning + reference copy", "lora": "LoRA r=16, reference = adapters disabled"}
    for variant, r in results.items():
        print(f"  {names[variant]:<44}{r['peak_mib']:>10,.0f}{r['weights_mib']:>13,.0f}{r['trainable']:>14,}{r['seconds']:>9.1f}")
    ratio = results["lora"]["peak_mib"] / results["full"]["peak_mib"]
    print(f"  LoRA / full peak memory: {ratio:.2f}")
    write_json(args.json, {
        "lora_vs_full_memory": round(ratio, 3), "peak_mib": {k: round(r["peak_mib"], 1) for k, r in results.items()},
        "size": args.size, "batch": args.batch, "device": args.device, "bf16": args.bf16,
    })


if __name__ == "__main__":
    main()
