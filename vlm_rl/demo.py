"""`vlm-rl demo`: make-tiny-model -> make-data -> SFT -> PPO -> compare, on CPU, with no download.

The demonstrations are noisy (a fraction of the SFT answers is wrong, as human demonstrations are),
so SFT alone learns an imperfect policy; PPO with a verifiable exact-match reward then has something
real to fix. Each stage calls the same function its `vlm-rl` command calls. `--tasks motion` (or `appear`) runs
it on short clips instead of pictures (`vlm_rl.data.synthetic_clips`).

`--estimators gae,gae:separate,grpo,dapo,gspo,rloo` trains one policy per variant (an advantage estimator, for gae
optionally with its critic, or a GRPO-family recipe: dapo, dr_grpo, gspo) from the same SFT checkpoint, with the
same reward, prompts, seed and episode budget, and compares them all with SFT in one report.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from vlm_rl.training.recipes import RECIPES


# Settings that depend on the demo's tasks, where not given (with several tasks: the most any of them needs).
# colour: the model learns to see the colours late in SFT: at 700 steps two seeds of 0-4 had not yet (greedy exact
# match 0.58 and 0.90), at 1200 all had (0.975-0.998).
# motion: with 30% wrong demonstrations, 700 SFT steps teach the tiny model the axis of a motion but not its sign
# (greedy held-out accuracy 0.47: left/right vs top/bottom), 1500 teach both (1.0), as 600 steps do without noise;
# PPO then fixes the demonstrators' mistakes within ~15 iterations, and on a task it has mastered (every reward 1)
# the whitened advantages are noise that broke the policy after ~35 iterations in both runs measured (lr 1e-3, 5e-4):
# 25 iterations (README: Video).
TASK_DEFAULTS = {"sft_steps": 1200, "ppo_episodes": 4800}
TASK_SETTINGS = {"motion": {"sft_steps": 1500, "ppo_episodes": 1600}}


@dataclass
class DemoConfig:
    out: str = "outputs/demo"
    overwrite: bool = False  # replace a non-empty `out` (default: refuse it before any stage runs)
    seed: int = 0
    family: str = "qwen2_vl"  # the tiny model's family (vlm_rl.models.families); the settings below were tuned on qwen2_vl
    # data: colour questions, 30% of the demonstrations wrong
    n: int = 2000
    noise: float = 0.3
    tasks: str = "colour"
    # SFT (higher learning rates collapse the tiny model to the answer prior)
    sft_steps: int | None = None  # default: 1200, or the most the tasks need (TASK_SETTINGS)
    sft_batch_size: int = 8
    sft_learning_rate: float = 3e-4
    # PPO
    ppo_episodes: int | None = None  # default: 4800, or the most the tasks need (TASK_SETTINGS)
    ppo_batch_size: int = 64
    ppo_mini_batches: int = 4
    ppo_epochs: int = 2
    # Against the oversized updates that broke some seeds' runs (README: Demo results): a rate of 5e-4 (1e-3 before),
    # a KL weight of 0.1 (0.02) that pulls a policy back after an excursion, and an early stop of each iteration's
    # optimisation once a mini-batch's approximate KL to the rollout policy passes 1.5 x target_kl.
    ppo_learning_rate: float = 5e-4
    kl_coef: float = 0.1
    target_kl: float | None = 0.05
    estimators: str = "gae"  # comma-separated variants: gae (critic shared), gae:separate, grpo, rloo, reinforce_pp, dapo, dr_grpo, gspo
    num_generations: int = 4  # samples per prompt for grpo, rloo and the recipes (the others: 1); the episode budget is the same
    temperature: float = 1.0
    max_new_tokens: int = 4
    # multi-turn (--tasks zoom only)
    max_turns: int = 3
    max_total_tokens: int = 256
    # compare
    compare_samples: int | None = None


def stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.time()


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage into `cfg.out`; returns the comparison summary (also in `out/report/summary.json`).
    A non-empty `cfg.out` is refused unless `cfg.overwrite`, which lets every stage replace its output."""
    from vlm_rl.atomic import refuse_existing_output
    from vlm_rl.evaluation.compare import run_compare
    from vlm_rl.sft import parse_args as parse_sft_args
    from vlm_rl.sft import run_sft
    from vlm_rl.data.synthetic import make_synthetic_data
    from vlm_rl.models.tiny import make_tiny_model

    from vlm_rl.models.families import get_family

    get_family(cfg.family)  # an unknown family or variant is refused before anything is written
    if cfg.tasks == "zoom":
        from vlm_rl.zoom_demo import run_zoom_demo

        return run_zoom_demo(cfg)
    variants = parse_variants(cfg.estimators)
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
            "--max_steps", str(task_setting(cfg, "sft_steps")),
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

    runs = {}
    for k, (name, estimator, critic) in enumerate(variants):
        single = len(variants) == 1
        t = stage("4/5 PPO" + ("" if single else f" ({k + 1}/{len(variants)}: {name})"))
        run_dir = out / ("ppo" if single else f"ppo-{name}")
        run_ppo(cfg, sft_dir, data_dir, run_dir, estimator, critic, recipe=name if name in RECIPES else None)
        runs["rl" if single else name] = str(run_dir)
        timings["ppo" if single else f"ppo-{name}"] = time.time() - t

    t = stage("5/5 compare")
    summary = run_compare(
        models={"sft": str(sft_dir), **runs},
        data=str(data_dir / "test.jsonl"),
        reward_specs=["exact_match"],
        out_dir=str(out / "report"),
        runs=runs,
        max_samples=cfg.compare_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    timings["compare"] = time.time() - t
    (out / "demo.json").write_text(json.dumps({"config": asdict(cfg), "timings_s": timings, "summary": summary}, indent=2))
    return summary


def parse_variants(spec: str) -> list[tuple[str, str, str]]:
    """'gae,gae:separate,grpo,dapo' -> [(name, advantage_estimator, critic)] (a recipe's name is its variant's); a
    UserError for an unknown one."""
    from vlm_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, CRITIC_FREE_ESTIMATORS
    from vlm_rl.errors import UserError

    variants = []
    for item in (v.strip() for v in spec.split(",") if v.strip()):
        estimator, _, critic = item.partition(":")
        if estimator in RECIPES and not critic:
            variants.append((estimator, RECIPES[estimator].settings["advantage_estimator"], "shared"))
            continue
        if estimator not in ADVANTAGE_ESTIMATORS or (critic and (estimator in CRITIC_FREE_ESTIMATORS or critic not in ("shared", "separate"))):
            raise UserError(
                f"--estimators: unknown variant {item!r}; use {', '.join(ADVANTAGE_ESTIMATORS)}, a recipe ({', '.join(RECIPES)}), "
                "or gae:shared / gae:separate (the demo trains the full model, so no LoRA critic)"
            )
        name = estimator if critic in ("", "shared") else f"{estimator}-{critic}"
        variants.append((name, estimator, critic or "shared"))
    names = [name for name, _, _ in variants]
    if not names or len(set(names)) < len(names):
        raise UserError(f"--estimators {spec!r}: give one or more different variants")
    return variants


def task_setting(cfg: DemoConfig, name: str) -> int:
    """`cfg.<name>` if given, else the most any of the demo's tasks needs (`TASK_SETTINGS`, `TASK_DEFAULTS`)."""
    given = getattr(cfg, name)
    return given if given is not None else max(TASK_SETTINGS.get(t, {}).get(name, TASK_DEFAULTS[name]) for t in cfg.tasks.split(","))


def run_ppo(cfg: DemoConfig, sft_dir: Path, data_dir: Path, run_dir: Path, estimator: str, critic: str, recipe: str | None = None) -> None:
    """PPO from the SFT checkpoint with `estimator` (and `critic`, for gae), on the demo's reward and budget; a
    `recipe` (training/recipes.py) sets its fields over the demo's."""
    from vlm_rl.training.config import PPOConfig
    from vlm_rl.ppo import build_trainer
    from vlm_rl.training.recipes import recipe_settings

    group = estimator in ("grpo", "rloo")
    settings = dict(
        output_dir=str(run_dir),
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
        total_episodes=task_setting(cfg, "ppo_episodes"),
        num_ppo_epochs=cfg.ppo_epochs,
        learning_rate=cfg.ppo_learning_rate,
        kl_coef=cfg.kl_coef,
        target_kl=cfg.target_kl,
        advantage_estimator=estimator,
        num_generations=cfg.num_generations if group else 1,
        **({"critic": critic} if estimator == "gae" else {}),
        missing_eos_penalty=1.0,
        eval_data=str(data_dir / "test.jsonl"),  # held-out reward curves in the logs and the report
        eval_num_samples=cfg.ppo_batch_size,
        logging_steps=1,
        save_steps=0,
        report_to="tensorboard",
        disable_tqdm=False,
        overwrite_output_dir=cfg.overwrite,
    )
    build_trainer(PPOConfig(**{**settings, **(recipe_settings(recipe) if recipe else {})})).train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-rl demo", description=__doc__.splitlines()[0])
    for f in fields(DemoConfig):
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
            continue
        kind = int if f.type in ("int", "int | None") else float if f.type in ("float", "float | None") else str
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    parser.add_argument("--torch-num-threads", type=int, default=1, help="1 is fastest for the tiny model")
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("torch_num_threads"))
    started = time.time()
    summary = run_demo(DemoConfig(**args))
    if args["tasks"] == "zoom":
        print_zoom_summary(summary, started, args["out"])
        return
    timings = json.loads((Path(args["out"]) / "demo.json").read_text())["timings_s"]
    sft = summary["models"]["sft"]
    print(f"\nheld-out exact match (sampled, T={args['temperature']}), {sft['n']} prompts:")
    print(f"  {'model':<14} {'reward':>7} {'- SFT [95% CI]':>24} {'KL to SFT':>10} {'PPO time':>9}")
    print(f"  {'sft':<14} {sft['mean_reward']:>7.3f}")
    for name, diff in summary["differences"].items():
        model = summary["models"][name]
        ci = f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        seconds = timings.get("ppo" if name == "rl" else f"ppo-{name}", float("nan"))
        print(f"  {name:<14} {model['mean_reward']:>7.3f} {ci:>24} {model['kl_to_first']:>10.3f} {seconds:>8.0f}s")
    print(f"demo finished in {time.time() - started:.0f} s; report: {Path(args['out']) / 'report' / 'report.html'}")


def print_zoom_summary(summary: dict, started: float, out: str) -> None:
    single = summary["single_turn"]["models"]["single-turn"]
    models, diff = summary["tools"]["models"], summary["tools"]["differences"]["rl"]
    print(f"\nheld-out exact match, {single['n']} prompts: single-turn {single['mean_reward']:.3f} "
          f"[{single['ci95'][0]:.3f}, {single['ci95'][1]:.3f}]")
    for name in ("sft", "rl"):
        m = models[name]
        print(f"  {name:<4} with zoom: {m['mean_reward']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]  "
              f"tool calls/answer {m['tool_calls_per_answer']:.2f}  turns {m['turns_mean']:.2f}")
    print(f"  rl - sft: {diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]")
    print(f"demo finished in {time.time() - started:.0f} s; reports: {Path(out) / 'report' / 'report.html'}, {Path(out) / 'report-single-turn'}")


if __name__ == "__main__":
    main()
