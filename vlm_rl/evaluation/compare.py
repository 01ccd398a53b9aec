"""`vlm-rl compare`: generate from several checkpoints on the same prompts, score, and report side by side.

Every model sees the same prompts, in the same batches, with the same seeds and the same explicit
generation config. KL to the first model is the mean per-token k1 estimate on each model's own samples:
mean over response tokens of log p_model(y_t) - log p_first(y_t).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlm_rl.evaluation.statistics import read_training_curves, summarize
from vlm_rl.data.formats import load_samples, prompt_text, reward_kwargs
from vlm_rl.evaluation.generate import generate_all
from vlm_rl.models.families import family_of
from vlm_rl.rollout.multi_turn import setup_multi_turn
from vlm_rl.rollout.generation import make_generation_config
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.algorithms.masking import masked_mean
from vlm_rl.models.loading import image_resize, load_base_model, load_processor
from vlm_rl.data.bad_rows import write_skipped_rows
from vlm_rl.data.validate import check_data
from vlm_rl.evaluation.report import write_report


def parse_named(values: list[str], flag: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} expects NAME=PATH, got {value!r}")
        if name in named:
            raise SystemExit(f"{flag}: the name {name!r} is used twice")
        named[name] = path
    return named


def score_generations(
    reward, samples: list[dict], completions: list[str], eos: list[bool], lengths: list[int], kls: list[float]
) -> tuple[list[dict], list[float | None]]:
    """One model's per-prompt records for `summarize`, and its combined reward per prompt.

    The rewards receive `completion_ended=eos`: whether each response ended with an eos token.
    """
    columns = {**reward_kwargs(samples), "completion_ended": list(eos)}
    _, combined = reward.score([s["prompt"] for s in samples], completions, **columns)
    records = [
        {"prompt_id": i, "reward": r, "eos": e, "length": n, "kl_to_first": kl}
        for i, (r, e, n, kl) in enumerate(zip(combined, eos, lengths, kls, strict=True))
    ]
    return records, combined


def run_compare(
    models: dict[str, str],
    data: str,
    reward_specs: list[str],
    out_dir: str,
    runs: dict[str, str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    do_sample: bool = True,
    seed: int = 0,
    num_report_samples: int = 12,
    column_map: str | None = None,
    skip_bad_rows: bool = False,
    max_bad_row_fraction: float = 0.1,
    tools: str | None = None,
    environment: str | None = None,
    max_turns: int = 4,
    max_total_tokens: int = 512,
) -> dict:
    """Generate, score and write `summary.json` + `report.html` into `out_dir`; returns the summary. Every row is
    checked first (a reward server asked); with `skip_bad_rows` the bad ones are left out and named in
    `out_dir/skipped_rows.jsonl`. With `tools` or `environment`, multi-turn rollouts as in PPO: the last turn is
    scored, each model's turns and tool calls per answer are in the summary, and the report shows every turn."""
    from reward_models.registry import load_rewards, reward_columns

    report = check_data(data, "ppo", split="test", column_map=column_map, required_columns=reward_columns(reward_specs))
    bad = report.rows_to_skip(skip_bad_rows, max_bad_row_fraction)
    write_skipped_rows(out_dir, [bad])
    dataset = load_samples(data, split="test", column_map=column_map, skip=bad.sources, check_images=False)
    reward = load_rewards(reward_specs)
    names = list(models)
    first_model = None
    records: dict[str, list[dict]] = {}
    texts: dict[str, list[str]] = {}
    scores: dict[str, list[float | None]] = {}
    turns: dict[str, list] = {}  # multi-turn: each model's trajectories
    for name in names:
        processor = load_processor(models[name])
        dataset.resize = image_resize(models[name], processor)  # each model sees its images sized for its processor
        samples = list(dataset[: max_samples or len(dataset)])
        model = load_base_model(models[name], torch.float32).eval()
        config = make_generation_config(processor.tokenizer, max_new_tokens, temperature=temperature, do_sample=do_sample)
        multi_turn = setup_multi_turn(processor, family_of(model), tools, environment, max_turns, max_total_tokens)
        rollouts = generate_all(model, processor, samples, config, batch_size, seed, desc=f"generate {name}", multi_turn=multi_turn)
        completions, kls, eos, lengths = [], [], [], []
        for rollout in rollouts:
            if rollout.trajectories is not None:
                turns.setdefault(name, []).extend(rollout.trajectories)
                completions += [t.answer for t in rollout.trajectories]
            else:
                completions += processor.batch_decode(rollout.responses, skip_special_tokens=True)
            eos += rollout.has_eos.tolist()
            lengths += rollout.response_lengths.tolist()
            if first_model is None:
                kls += [0.0] * len(rollout)
            else:
                own, _ = response_logprobs(model, rollout, temperature if do_sample else 1.0)
                ref, _ = response_logprobs(first_model, rollout, temperature if do_sample else 1.0)
                kls += masked_mean(own - ref, rollout.response_mask, dim=1).tolist()
        records[name], combined = score_generations(reward, samples, completions, eos, lengths, kls)
        texts[name], scores[name] = completions, combined
        if first_model is None:
            first_model = model
    summary = summarize(records, names)
    for name, trajectories in turns.items():
        summary["models"][name]["turns_mean"] = sum(t.turns for t in trajectories) / len(trajectories)
        summary["models"][name]["tool_calls_per_answer"] = sum(t.tool_calls for t in trajectories) / len(trajectories)
        summary["models"][name]["tool_errors_per_answer"] = sum(t.tool_errors for t in trajectories) / len(trajectories)
    curves = {name: read_training_curves(path) for name, path in (runs or {}).items()}
    curves = {name: c for name, c in curves.items() if c}
    report_samples = [
        {
            "image": s["images"][0] if s["images"] else None,
            "video": s["videos"][0].frame_images() if s.get("videos") else None,
            "prompt": prompt_text(s["prompt"]),
            "answer": s.get("answer"),
            "responses": {
                name: {"text": texts[name][i], "reward": scores[name][i], **({"turns": turns[name][i].messages} if name in turns else {})}
                for name in names
            },
        }
        for i, s in enumerate(samples[:num_report_samples])
    ]
    meta = {
        "data": data,
        "prompts": len(samples),
        "reward": ", ".join(reward_specs),
        "generation": f"max_new_tokens={max_new_tokens}, " + (f"sampling, temperature={temperature}, top_k=0, top_p=1" if do_sample else "greedy"),
        "seed": seed,
    }
    path = write_report(out_dir, summary, curves, report_samples, names, meta=meta)
    print(f"report: {path}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-rl compare", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a checkpoint (full or adapter); the first is the baseline")
    parser.add_argument("--data", required=True, help="prompts (any supported format; 'answer' column for VQA rewards)")
    parser.add_argument("--reward", action="append", default=None, metavar="SPEC[:WEIGHT]", help="default: exact_match")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="training run whose logs to plot (default: each --model dir that has them)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--column_map", "--column-map", default=None, help="rename columns first: SOURCE=TARGET,... (e.g. question=prompt,img=image)")
    parser.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true", help="skip rows that fail the data check (named in OUT/skipped_rows.jsonl)")
    parser.add_argument("--max_bad_row_fraction", "--max-bad-row-fraction", type=float, default=0.1, help="with --skip_bad_rows: stop when more rows are bad")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tools", default=None, help="multi-turn rollouts with tools, as PPO's --tools ('zoom' or module:function,...)")
    parser.add_argument("--environment", default=None, help="multi-turn rollouts with an environment class module:Class, as PPO's")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-total-tokens", type=int, default=512)
    parser.add_argument("--num-report-samples", type=int, default=12)
    parser.add_argument("--torch-num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.torch_num_threads:
        torch.set_num_threads(args.torch_num_threads)
    models = parse_named(args.model, "--model")
    runs = parse_named(args.run, "--run") or {n: p for n, p in models.items() if (Path(p) / "trainer_state.json").exists() or list(Path(p).glob("checkpoint-*/trainer_state.json"))}
    summary = run_compare(
        models, args.data, args.reward or ["exact_match"], args.out, runs=runs, max_samples=args.max_samples,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        do_sample=not args.greedy, seed=args.seed, num_report_samples=args.num_report_samples, column_map=args.column_map,
        skip_bad_rows=args.skip_bad_rows, max_bad_row_fraction=args.max_bad_row_fraction, tools=args.tools,
        environment=args.environment, max_turns=args.max_turns, max_total_tokens=args.max_total_tokens,
    )
    for name, m in summary["models"].items():
        line = f"{name:>12}: reward {m['mean_reward']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]  eos {m['eos_rate']:.2f}  len {m['mean_length']:.1f}  kl {m['kl_to_first']:.3f}"
        if "tool_calls_per_answer" in m:
            line += f"  turns {m['turns_mean']:.2f}  tool calls/answer {m['tool_calls_per_answer']:.2f}"
        if name in summary["differences"]:
            d = summary["differences"][name]
            line += f"  diff {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        print(line)


if __name__ == "__main__":
    main()
