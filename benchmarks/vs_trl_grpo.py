"""vlm-rl's GRPO against TRL's `GRPOTrainer` (1.16) on identical work: seconds per iteration in steady state.

The same work on both sides: the embedded tiny Qwen2-VL (the same files), the same synthetic prompts with their
images (or, `text`, the same questions without them), `--prompts` prompts x G samples per iteration, up to
`--response` new tokens at temperature 1, the same rule reward (characters in the completion), the same KL
coefficient (TRL's `beta`, in its loss; vlm-rl's `kl_coef`, in its per-token reward: both run the reference on every
sample), one optimisation pass and one optimiser step per iteration over the whole batch in one micro-batch (TRL:
`num_iterations` 1, `per_device_train_batch_size` = the batch; vlm-rl: `num_ppo_epochs` 1, the same), full
fine-tuning with a frozen vision tower and a frozen reference copy, no activation checkpointing (TRL's default has
it), fp32, one thread. TRL's processor is loaded with
`padding_side="left"` (right padding misplaces Qwen2-VL's M-RoPE positions in its generate, trl#5785).

Each run is a fresh process; the runs alternate (TRL, vlm-rl, TRL, vlm-rl, ...) so that load from elsewhere on the
machine hits both alike. A run's figure is the median of its iterations after `--warmup`; each side's best run
counts. Wall and CPU seconds (of the run's process: on a loaded machine, those of a one-thread run follow the work
done) are both reported. Both sides are checked to see the images: their vision towers run over the prompts' images
in every iteration (TRL: every forward takes `pixel_values`; vlm-rl: once per distinct image, every forward reads the
features), and never in the text-only runs.

    python benchmarks/vs_trl_grpo.py [--generations 8] [--prompts 4] [--response 8] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("trl", "vlmrl")


def response_length(prompts, completions, **kwargs):
    """TRL's side of the rule reward (benchmarks/_common.py's `response_length`): characters in the completion, which TRL
    gives as a conversation."""
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def text_only(sample: dict) -> dict:
    """The sample's question without its image."""
    messages = [
        {**m, "content": [part for part in m["content"] if part["type"] != "image"]} if isinstance(m["content"], list) else m
        for m in sample["prompt"]
    ]
    return {**sample, "prompt": messages, "images": []}


class TowerWatch:
    """Per iteration: the policy's vision tower runs and the images it encoded, and the policy's backbone forwards that
    took the images as pixels or as encoded features."""

    def __init__(self, model):
        from vlm_rl.models.families import vision_backbone
        from vlm_rl.models.vision_features import vision_tower

        self.seen = dict.fromkeys(("tower_runs", "images", "forwards_with_pixels", "forwards_with_features"), 0)
        vision_tower(model).register_forward_pre_hook(self.tower, with_kwargs=True)
        vision_backbone(model).register_forward_pre_hook(self.forward, with_kwargs=True)

    def tower(self, module, args, kwargs):
        self.seen["tower_runs"] += 1
        self.seen["images"] += kwargs.get("grid_thw", args[1] if len(args) > 1 else None).shape[0]

    def forward(self, module, args, kwargs):
        self.seen["forwards_with_pixels"] += kwargs.get("pixel_values") is not None
        self.seen["forwards_with_features"] += (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None

    def take(self) -> dict:
        seen, self.seen = self.seen, dict.fromkeys(self.seen, 0)
        return seen


def run_trl(args, model_dir: Path, samples: list[dict], out: Path) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    processor = AutoProcessor.from_pretrained(model_dir, padding_side="left")  # trl#5785
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    model.model.visual.requires_grad_(False)  # as vlm-rl's freeze_vision_tower
    rows = [{"prompt": s["prompt"], **({"images": s["images"]} if s["images"] else {})} for s in samples]
    watch = TowerWatch(model)
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *_, **__):
            wall, cpu = self.start
            steps.append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, **watch.take()})

    batch = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=args.generations,
        max_completion_length=args.response, temperature=1.0, top_p=1.0, beta=args.kl_coef, num_iterations=args.epochs,
        learning_rate=args.learning_rate, max_steps=(args.warmup + args.iterations) * args.epochs, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, bf16=False, disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default recomputes activations in the backward; vlm-rl's does not
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[response_length], args=config, train_dataset=Dataset.from_list(rows),
        processing_class=processor, callbacks=[Clock()],
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.train()
    # one iteration: a generation batch and its `num_iterations` optimiser steps
    return [{k: sum(s[k] for s in steps[i : i + args.epochs]) for k in steps[i]} for i in range(0, len(steps), args.epochs)]


def run_vlmrl(args, model_dir: Path, samples: list[dict], out: Path) -> list[dict]:
    import torch

    from _common import ppo_trainer, timed

    batch = args.prompts * args.generations
    trainer = ppo_trainer(
        model_dir, out, samples, batch, args.response, args.epochs, advantage_estimator="grpo", num_generations=args.generations,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, local_rollout_forward_batch_size=batch,
        kl_coef=args.kl_coef, temperature=1.0, learning_rate=args.learning_rate, logging_steps=1,
        total_episodes=batch * (args.warmup + args.iterations), save_steps=0,
    )  # fmt: skip
    watch = TowerWatch(trainer.model.policy)
    steps: list[dict] = []
    iteration = trainer.iteration

    def clocked(i):
        metrics, wall, cpu = timed(iteration, i)
        steps.append({"wall": wall, "cpu": cpu, **watch.take()})
        return metrics

    trainer.iteration = clocked
    torch.manual_seed(0)
    trainer.train()
    return steps


def child(args) -> None:
    """One run of one system in this process; prints its per-iteration figures as one JSON line."""
    import contextlib
    import io

    import torch

    from _common import synthetic_samples
    from vlm_rl.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = Path(args.model_dir) if args.model_dir else make_tiny_model(root / "model")
    samples = synthetic_samples(root, args.prompts * (args.warmup + args.iterations))
    if args.text:
        samples = [text_only(s) for s in samples]
    run = run_trl if args.child == "trl" else run_vlmrl
    with contextlib.redirect_stdout(io.StringIO()):  # the trainers' own console lines
        steps = run(args, model_dir, samples, root / "run")
    print(json.dumps(steps))


def median_after_warmup(steps: list[dict], warmup: int, key: str) -> float:
    return statistics.median(s[key] for s in steps[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generations", type=int, default=8, help="num_generations G")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--response", type=int, default=8, help="max new tokens (the synthetic task's answers are a word or two)")
    parser.add_argument("--epochs", type=int, default=1, help="optimisation passes over each batch (TRL num_iterations)")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=2, help="iterations not counted, per run")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each system, alternated")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--text", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from _common import write_json
    from vlm_rl.models.tiny import make_tiny_model

    model_dir = make_tiny_model(Path(tempfile.mkdtemp(prefix="vlm-rl-bench-")) / "model")  # the same files for both
    shared = ["--generations", str(args.generations), "--prompts", str(args.prompts), "--response", str(args.response), "--epochs", str(args.epochs),
              "--kl-coef", str(args.kl_coef), "--learning-rate", str(args.learning_rate), "--warmup", str(args.warmup),
              "--iterations", str(args.iterations), "--model-dir", str(model_dir)]
    results = {}
    for kind in ("images", "text"):
        runs = {system: [] for system in SYSTEMS}
        for _ in range(args.rounds):
            for system in SYSTEMS:
                command = [sys.executable, __file__, "--child", system, *shared, *(["--text"] if kind == "text" else [])]
                out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                runs[system].append(json.loads(out.stdout.strip().splitlines()[-1]))
        figures = {}
        for system, system_runs in runs.items():
            steps = [s for run in system_runs for s in run[args.warmup :]]
            images = {s["images"] for s in steps}
            seeing = [s["forwards_with_pixels"] + s["forwards_with_features"] for s in steps]  # policy forwards given the images
            if kind == "images":  # in every iteration the tower ran and generate and the training forward saw the images
                assert 0 not in images and min(seeing) >= 2, (system, steps)
            else:
                assert images == {0} and max(seeing) == 0, (system, steps)
            figures[system] = {
                "wall": min(median_after_warmup(run, args.warmup, "wall") for run in system_runs),
                "cpu": min(median_after_warmup(run, args.warmup, "cpu") for run in system_runs),
                **{key: max(s[key] for s in steps) for key in steps[0] if key not in ("wall", "cpu")},
            }
        results[kind] = figures
    batch = args.prompts * args.generations
    print(f"GRPO on the tiny Qwen2-VL, {args.prompts} prompts x G = {args.generations} = {batch} samples per iteration, up to "
          f"{args.response} new tokens, beta = kl_coef = {args.kl_coef}, one pass, one thread; seconds per iteration (median "
          f"after {args.warmup} warm-up iterations, best of {args.rounds} alternated runs)")
    print(f"  {'':<16}{'TRL s':>8}{'(CPU)':>8}{'vlm-rl s':>10}{'(CPU)':>8}{'TRL / vlm-rl':>14}{'(CPU)':>8}   images encoded per iteration (TRL, vlm-rl)")
    ratios = {}
    for kind, figures in results.items():
        trl, ours = figures["trl"], figures["vlmrl"]
        ratios[kind] = (trl["wall"] / ours["wall"], trl["cpu"] / ours["cpu"])
        print(f"  {kind:<16}{trl['wall']:>8.3f}{trl['cpu']:>8.3f}{ours['wall']:>10.3f}{ours['cpu']:>8.3f}{ratios[kind][0]:>14.2f}"
              f"{ratios[kind][1]:>8.2f}   {trl['images']}, {ours['images']}")
    write_json(args.json, {
        "trl_over_vlmrl_images": round(ratios["images"][0], 3), "trl_over_vlmrl_text": round(ratios["text"][0], 3),
        "trl_over_vlmrl_images_cpu": round(ratios["images"][1], 3), "trl_over_vlmrl_text_cpu": round(ratios["text"][1], 3),
        "seconds_per_iteration": results, "generations": args.generations, "prompts": args.prompts, "response": args.response,
    })


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
