"""Each rollout image through the vision tower once (reuse_vision_features) vs every forward encoding its images.

On a random-weight Qwen2-VL with Qwen2-VL-2B's vision-tower / language-model proportions (`--size cpu`, the
default: widths / 8, depths set so that the tower's share of a forward's FLOPs is the 2B's), every image
448 x 448 pixels (256 vision tokens), prompts of ~100 text tokens. Two measurements, each way in the same run:
  1. one training forward+backward (policy logprobs and values, micro-batch of `--batch`);
  2. one whole PPO iteration (rollout, old-policy/value and reference forwards, `--epochs` PPO epochs), full
     fine-tuning with the frozen tower and its reference copy.

    python benchmarks/vision_reuse.py [--batch 4] [--json PATH]
    python benchmarks/vision_reuse.py --size 2b --device cuda --bf16 --batch 8 --peak-tflops 989   # on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from _common import SIZES, best_of, forward_flops, make_sized_model, ppo_trainer, prepare, synthetic_samples, write_json


def synchronised(fn, device: torch.device):
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call


def train_step(args, model_dir: Path, samples: list[dict], device: torch.device) -> dict:
    """One forward+backward of the policy and value head over a rollout micro-batch, with pixels and with features."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vlm_rl.models.critic import Critic, PolicyAndValue
    from vlm_rl.models.families import family_of
    from vlm_rl.rollout.batch import Rollout
    from vlm_rl.data.prompts import encode_prompts
    from vlm_rl.models.value_head import ValueHead
    from vlm_rl.models.vision_features import encode_images

    processor = AutoProcessor.from_pretrained(model_dir)
    policy = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).to(device)
    policy.model.visual.requires_grad_(False)  # the default: full fine-tuning with the tower frozen
    model = PolicyAndValue(policy, Critic(ValueHead(policy.config.text_config.hidden_size))).to(device).train()
    torch.nn.init.normal_(model.value_head.summary.weight, std=0.02)
    query = encode_prompts(processor, samples[: args.batch])
    query = {k: v.to(device) if torch.is_tensor(v) else v for k, v in query.items()}
    responses = torch.randint(0, 400, (args.batch, args.response), generator=torch.Generator().manual_seed(0)).to(device)
    pixels = Rollout.from_generation(query, responses, [10**9], 0, [f"s{i}" for i in range(args.batch)], family_of(policy))  # no eos
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        features = replace(pixels, image_features=encode_images(policy, query["pixel_values"], query["image_grid_thw"]))

    def step(rollout):
        model.zero_grad(set_to_none=True)
        with autocast:
            logprobs, _, values = model(rollout, 1.0)
        (logprobs.sum() + values.sum()).backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (lp_pixels, grads_pixels), (lp_features, grads_features) = step(pixels), step(features)
    # exact: the features come from the same get_image_features call on the same pixel batch as the pixel path's
    exact = torch.equal(lp_pixels, lp_features) and all(torch.equal(grads_pixels[n], grads_features[n]) for n in grads_pixels)
    times = {"pixels": [], "features": []}
    for _ in range(args.repeats):  # interleaved, so that load from elsewhere on the machine hits both alike
        times["pixels"].append(best_of(synchronised(lambda: step(pixels), device), 1))
        times["features"].append(best_of(synchronised(lambda: step(features), device), 1))
    return {"pixels": min(times["pixels"]), "features": min(times["features"]), "exact": exact,
            "prompt_tokens": pixels.context_length}


def ppo_iteration(args, model_dir: Path, root: Path, device: torch.device) -> dict:
    """One PPO iteration of two trainers that differ only in reuse_vision_features, from the same seed."""
    from vlm_rl.models.vision_features import vision_tower

    trainers, calls = {}, {}
    for reuse in (True, False):
        trainer = ppo_trainer(model_dir, root / f"run-{reuse}", args.samples, args.batch, args.response, args.epochs,
                              device.type, args.bf16, reuse_vision_features=reuse)
        trainers[reuse] = prepare(trainer)
        calls[reuse] = [0]
        for model in (trainer.model.policy, trainer.ref_model):
            vision_tower(model).register_forward_hook(lambda *_, c=calls[reuse]: c.__setitem__(0, c[0] + 1))
    times = {True: [], False: []}
    for i in range(args.iterations + 1):  # the first is a warm-up
        for reuse, trainer in trainers.items():
            torch.manual_seed(i)
            calls[reuse][0] = 0
            seconds = best_of(synchronised(lambda: trainer.iteration(i), device), 1)
            if i:
                times[reuse].append(seconds)
    return {"features": min(times[True]), "pixels": min(times[False]), "tower_runs_features": calls[True][0],
            "tower_runs_pixels": calls[False][0], "sharing": trainers[True].sharing.describe()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu: Qwen2-VL-2B's proportions scaled to 2 CPU cores; 2b: its sizes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--response", type=int, default=64, help="response tokens")
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens per prompt (template included)")
    parser.add_argument("--epochs", type=int, default=4, help="num_ppo_epochs of the PPO iteration")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps each way (the fastest counts)")
    parser.add_argument("--iterations", type=int, default=1, help="timed PPO iterations each way, after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights), as --bf16 in PPO")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOPS, to print MFU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the headline figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_sized_model(root / "model", args.size)
    from transformers import AutoProcessor

    args.samples = synthetic_samples(root, max(args.batch * (args.iterations + 1), 8), args.text_tokens, AutoProcessor.from_pretrained(model_dir))
    vision, language = forward_flops(SIZES[args.size], text=args.text_tokens, response=args.response, vocab=463 if args.size == "cpu" else 151_936)
    vision_2b, language_2b = forward_flops(SIZES["2b"], text=args.text_tokens, response=args.response)
    print(f"Qwen2-VL, size {args.size!r} {SIZES[args.size]}, {device}, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.threads} thread(s)")
    print(f"  one sample: 448x448 image (256 vision tokens) + ~{args.text_tokens} text + {args.response} response tokens")
    print(f"  vision tower's share of a forward's FLOPs: {vision / (vision + language):.2f} (Qwen2-VL-2B: {vision_2b / (vision_2b + language_2b):.2f})")

    step = train_step(args, model_dir, args.samples, device)
    print(f"\n1. one training forward+backward, batch {args.batch} ({step['prompt_tokens']}-token prompts); logprobs and gradients identical: {step['exact']}")
    print(f"  {'':<34}{'seconds':>9}")
    print(f"  {'pixels (every forward encodes)':<34}{step['pixels']:>9.3f}")
    print(f"  {'features (encoded once)':<34}{step['features']:>9.3f}")
    train_speedup = step["pixels"] / step["features"]
    print(f"  speed-up: {train_speedup:.2f}x")
    if args.peak_tflops:
        flops = args.batch * (vision + 3 * language)  # the tower runs forward only (frozen); the LM forward + backward
        print(f"  MFU (pixels way): {flops / step['pixels'] / 1e12 / args.peak_tflops:.1%}")

    it = ppo_iteration(args, model_dir, root, device)
    print(f"\n2. one PPO iteration: {args.batch} prompts, up to {args.response} new tokens, {args.epochs} PPO epochs, reference copy")
    print(f"  {it['sharing']}")
    print(f"  {'':<34}{'seconds':>9}{'tower runs':>12}")
    print(f"  {'pixels (every forward encodes)':<34}{it['pixels']:>9.2f}{it['tower_runs_pixels']:>12d}")
    print(f"  {'features (encoded once)':<34}{it['features']:>9.2f}{it['tower_runs_features']:>12d}")
    ppo_speedup = it["pixels"] / it["features"]
    print(f"  speed-up: {ppo_speedup:.2f}x")
    write_json(args.json, {
        "train_step_speedup": round(train_speedup, 3), "ppo_iteration_speedup": round(ppo_speedup, 3),
        "train_step_seconds": {k: round(step[k], 4) for k in ("pixels", "features")},
        "ppo_iteration_seconds": {k: round(it[k], 3) for k in ("pixels", "features")},
        "tower_runs_per_iteration": {"pixels": it["tower_runs_pixels"], "features": it["tower_runs_features"]},
        "exact": step["exact"], "vision_flops_share": round(vision / (vision + language), 3),
        "size": args.size, "batch": args.batch, "device": str(device), "bf16": args.bf16,
    })


if __name__ == "__main__":
    main()
