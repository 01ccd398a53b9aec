"""`vlm-rl demo --tasks zoom` (vlm_rl/demo.py hands its DemoConfig here): the multi-turn demo. make-tiny-model (its processor shows every picture at 56 x 56) ->
make-data --tasks zoom -> SFT on single-turn answers (the baseline that never zooms) and SFT on tool-use
demonstrations (a `noise` fraction of them guesses instead of zooming) -> PPO with the zoom tool, GAE and a critic
that sees every image of the trajectory -> compare (single-turn alone; SFT vs PPO with the tool, paired).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path


# The zoom demo's own defaults, for the fields left at DemoConfig's (which are tuned for one-word colour answers):
# a tool call is ~70 tokens of the tiny tokenizer, which sampling at 1.0 corrupts more often than not (0.5: no
# malformed call in 32 samples of the SFT model), and PPO at the colour demo's 1e-3 broke the SFT policy in its first
# update (KL 48 nats per trajectory, then answers without the tool). Its KL weight is the one it was measured with
# (README: Multi-turn), not the colour demo's 0.1.
ZOOM_SETTINGS = {
    "n": 1000, "sft_steps": 1000, "ppo_episodes": 1920, "max_new_tokens": 80, "temperature": 0.5, "ppo_learning_rate": 1e-4, "kl_coef": 0.02,
}  # fmt: skip


def zoom_settings(cfg):
    """`cfg` (vlm_rl.demo.DemoConfig) with ZOOM_SETTINGS wherever it holds the default (a flag given keeps its value)."""
    defaults = type(cfg)()
    return replace(cfg, **{k: v for k, v in ZOOM_SETTINGS.items() if getattr(cfg, k) == getattr(defaults, k)})


def stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.time()


def sft_args(cfg, model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--train_data", str(data), "--output_dir", str(out),
        "--max_steps", str(cfg.sft_steps), "--per_device_train_batch_size", str(cfg.sft_batch_size),
        "--learning_rate", str(cfg.sft_learning_rate), "--lr_scheduler_type", "constant", "--activation_checkpointing", "false",
        "--logging_steps", "50", "--save_strategy", "no", "--seed", str(cfg.seed), "--use_cpu", "true", "--report_to", "none",
        "--overwrite_output_dir", str(cfg.overwrite).lower(), *extra,
    ]  # fmt: skip


def run_zoom_demo(cfg) -> dict:
    """Every stage into `cfg.out`; returns {"single_turn": summary, "tools": summary} (also in `out/demo.json`)."""
    from vlm_rl.atomic import refuse_existing_output
    from vlm_rl.data.zoom_task import ZOOM_MAX_PIXELS, make_zoom_data
    from vlm_rl.models.loading import load_processor
    from vlm_rl.models.tiny import make_tiny_model
    from vlm_rl.sft import parse_args as parse_sft_args
    from vlm_rl.sft import run_sft

    cfg = zoom_settings(cfg)
    out = Path(cfg.out)
    if not cfg.overwrite:
        refuse_existing_output(out)
    timings = {}
    t = stage("1/6 make-tiny-model (pictures shown at 56 x 56)")
    model_dir = make_tiny_model(out / "model", seed=cfg.seed, family=cfg.family, overwrite=cfg.overwrite)
    load_processor(str(model_dir), max_pixels=ZOOM_MAX_PIXELS).save_pretrained(model_dir)  # every later stage reads it
    timings["make-tiny-model"] = time.time() - t

    t = stage("2/6 make-data --tasks zoom")
    data_dir = make_zoom_data(out / "data", n=cfg.n, seed=cfg.seed, noise=cfg.noise, overwrite=cfg.overwrite)
    timings["make-data"] = time.time() - t

    t = stage("3/6 SFT, single-turn (answers only)")
    single_dir = run_sft(parse_sft_args(sft_args(cfg, model_dir, data_dir / "train.jsonl", out / "sft-single")))
    timings["sft-single"] = time.time() - t

    t = stage("4/6 SFT on tool-use demonstrations")
    sft_dir = run_sft(parse_sft_args(sft_args(cfg, model_dir, data_dir / "sft.jsonl", out / "sft", "--tools", "zoom")))
    timings["sft"] = time.time() - t

    return rl_and_compare(cfg, out, data_dir, single_dir, sft_dir, timings)


def rl_and_compare(cfg, out: Path, data_dir: Path, single_dir: Path, sft_dir: Path, timings: dict) -> dict:
    """Stages 5 and 6: PPO from the tool-use SFT model, then the comparisons; `out/demo.json`."""
    from vlm_rl.evaluation.compare import run_compare
    from vlm_rl.ppo import build_trainer
    from vlm_rl.training.config import PPOConfig

    t = stage("5/6 PPO with the zoom tool")
    ppo_dir = out / "ppo"
    config = PPOConfig(
        output_dir=str(ppo_dir), model_name_or_path=str(sft_dir), train_data=str(data_dir / "train.jsonl"), reward=["exact_match"],
        tools="zoom", max_turns=cfg.max_turns, max_total_tokens=cfg.max_total_tokens, use_cpu=True, seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        per_device_train_batch_size=cfg.ppo_batch_size // cfg.ppo_mini_batches, gradient_accumulation_steps=1,
        num_mini_batches=cfg.ppo_mini_batches, local_rollout_forward_batch_size=cfg.ppo_batch_size, total_episodes=cfg.ppo_episodes,
        num_ppo_epochs=cfg.ppo_epochs, learning_rate=cfg.ppo_learning_rate, kl_coef=cfg.kl_coef, advantage_estimator="gae",
        missing_eos_penalty=1.0, eval_data=str(data_dir / "test.jsonl"), eval_num_samples=32, logging_steps=1, save_steps=0,
        report_to="tensorboard", disable_tqdm=False, overwrite_output_dir=cfg.overwrite,
    )  # fmt: skip
    build_trainer(config).train()
    timings["ppo"] = time.time() - t

    t = stage("6/6 compare")
    common = dict(data=str(data_dir / "test.jsonl"), reward_specs=["exact_match"], max_samples=cfg.compare_samples,
                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)  # fmt: skip
    single = run_compare(models={"single-turn": str(single_dir)}, out_dir=str(out / "report-single-turn"), **common)
    tools = run_compare(
        models={"sft": str(sft_dir), "rl": str(ppo_dir)}, out_dir=str(out / "report"), runs={"rl": str(ppo_dir)}, tools="zoom",
        max_turns=cfg.max_turns, max_total_tokens=cfg.max_total_tokens, **common,
    )  # fmt: skip
    timings["compare"] = time.time() - t
    summary = {"single_turn": single, "tools": tools}
    (out / "demo.json").write_text(json.dumps({"config": asdict(cfg), "timings_s": timings, "summary": summary}, indent=2))
    return summary
