"""`vlm-rl demo`: make-tiny-model -> make-data -> SFT -> PPO -> compare, on CPU, with no download.

The demonstrations are noisy (a fraction of the SFT answers is wrong, as human demonstrations are),
so SFT alone learns an imperfect policy; PPO with a verifiable exact-match reward then has something
real to fix. Each stage calls the same function its `vlm-rl` command calls.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch


@dataclass
class DemoConfig:
    out: str = "outputs/demo"
    overwrite: bool = False  # replace a non-empty `out` (default: refuse it before any stage runs)
    seed: int = 0
    family: str = "qwen2_vl"  # the tiny model's family (vlm_rl.families); the settings below were tuned on qwen2_vl
    # data: colour questions, 30% of the demonstrations wrong
    n: int = 2000
    noise: float = 0.3
    tasks: str = "colour"
    # SFT (higher learning rates collapse the tiny model to the answer prior)
    sft_steps: int = 700
    sft_batch_size: int = 8
    sft_learning_rate: float = 3e-4
    # PPO
    ppo_episodes: int = 4800
    ppo_batch_size: int = 64
    ppo_mini_batches: int = 4
    ppo_epochs: int = 2
    ppo_learning_rate: float = 1e-3
    kl_coef: float = 0.02
    temperature: float = 1.0
    max_new_tokens: int = 4
    # compare
    compare_samples: int | None = None


def stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.time()


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage into `cfg.out`; returns the comparison summary (also in `out/report/summary.json`).
    A non-empty `cfg.out` is refused unless `cfg.overwrite`, which lets every stage replace its output."""
    from vlm_rl.atomic import refuse_existing_output
    from vlm_rl.compare import run_compare
    from vlm_rl.config import PPOConfig
    from vlm_rl.ppo import build_trainer
    from vlm_rl.sft import parse_args as parse_sft_args
    from vlm_rl.sft import run_sft
    from vlm_rl.synthetic_data import make_synthetic_data
    from vlm_rl.tiny import make_tiny_model

    from vlm_rl.families import get_family

    get_family(cfg.family)  # an unknown family is refused before anything is written
    out = Path(cfg.out)
    if not cfg.overwrite:
        refuse_existing_output(out)
    timings = {}

    t = stage("1/5 make-tiny-model")
    model_dir = make_tiny_model(out / "model", seed=cfg.seed, family=cfg.family, overwrite=cfg.overwrite)
    timings["make-tiny-model"] = time.time() - t

    t = stage("2/5 make-data")
    data_dir = make_synthetic_data(
        out / "data", n=cfg.n, seed=cfg.seed, noise=cfg.noise, tasks=cfg.tasks.split(","), overwrite=cfg.overwrite
    )
    timings["make-data"] = time.time() - t

    t = stage("3/5 SFT")
    sft_config = parse_sft_args(
        [
            "--model_name_or_path", str(model_dir),
            "--train_data", str(data_dir / "train.jsonl"),
            "--output_dir", str(out / "sft"),
            "--max_steps", str(cfg.sft_steps),
            "--per_device_train_batch_size", str(cfg.sft_batch_size),
            "--learning_rate", str(cfg.sft_learning_rate),
            "--lr_scheduler_type", "constant",
            "--activation_checkpointing", "false",
            "--logging_steps", "50",
            "--save_strategy", "no",
            "--seed", str(cfg.seed),
            "--use_cpu", "true",
            "--report_to", "none",
            "--overwrite_output_dir", str(cfg.overwrite).lower(),
        ]
    )
    sft_dir = run_sft(sft_config)
    timings["sft"] = time.time() - t

    t = stage("4/5 PPO")
    ppo_config = PPOConfig(
        output_dir=str(out / "ppo"),
        model_name_or_path=str(sft_dir),
        train_data=str(data_dir / "train.jsonl"),
        reward=["exact_match"],
        use_cpu=True,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        per_device_train_batch_size=cfg.ppo_batch_size // cfg.ppo_mini_batches,
        gradient_accumulation_steps=1,
        num_mini_batches=cfg.ppo_mini_batches,
        local_rollout_forward_batch_size=cfg.ppo_batch_size,
        total_episodes=cfg.ppo_episodes,
        num_ppo_epochs=cfg.ppo_epochs,
        learning_rate=cfg.ppo_learning_rate,
        kl_coef=cfg.kl_coef,
        missing_eos_penalty=1.0,
        eval_data=str(data_dir / "test.jsonl"),  # held-out reward curves in the logs and the report
        eval_num_samples=cfg.ppo_batch_size,
        logging_steps=1,
        save_steps=0,
        report_to="tensorboard",
        disable_tqdm=False,
        overwrite_output_dir=cfg.overwrite,
    )
    build_trainer(ppo_config).train()
    timings["ppo"] = time.time() - t

    t = stage("5/5 compare")
    summary = run_compare(
        models={"sft": str(sft_dir), "rl": str(out / "ppo")},
        data=str(data_dir / "test.jsonl"),
        reward_specs=["exact_match"],
        out_dir=str(out / "report"),
        runs={"rl": str(out / "ppo")},
        max_samples=cfg.compare_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    timings["compare"] = time.time() - t
    (out / "demo.json").write_text(json.dumps({"config": asdict(cfg), "timings_s": timings, "summary": summary}, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-rl demo", description=__doc__.splitlines()[0])
    for f in fields(DemoConfig):
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
            continue
        kind = int if f.type in ("int", "int | None") else float if f.type == "float" else str
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    parser.add_argument("--torch-num-threads", type=int, default=1, help="1 is fastest for the tiny model")
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("torch_num_threads"))
    started = time.time()
    summary = run_demo(DemoConfig(**args))
    sft, rl = summary["models"]["sft"], summary["models"]["rl"]
    diff = summary["differences"]["rl"]
    print(f"\nheld-out exact match (sampled, T={args['temperature']}): SFT {sft['mean_reward']:.3f} -> RL {rl['mean_reward']:.3f}")
    print(f"RL - SFT: {diff['mean']:+.3f}, 95% CI [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]")
    print(f"demo finished in {time.time() - started:.0f} s; report: {Path(args['out']) / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
