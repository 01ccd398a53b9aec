"""Launched by tests/training/test_ppo_entrypoint.py, test_estimators.py and test_sharding.py under `accelerate launch`:
trains briefly through `run_command` (as `vlm-rl ppo` does, its flags parsed as `vlm-rl ppo` parses them: TRL's names
and recipes too), then each rank records what it saw (its first prompts, each rollout's scores and which samples were
unscored), what it ended with (a checksum of every weight of the policy and critic, gathered whole on the rank under
ZeRO-3 and FSDP2), and the samples, scores, advantages and mask of one more rollout (to check that advantages are
whitened over the global batch, not per rank, and what dynamic sampling kept) in rank{r}.json; and, once the command
has returned, at exit, how the process is left (process group, threads, signal handlers) in rank{r}_exit.json."""

import atexit
import json
import os
import runpy
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

if os.environ.get("ACCELERATE_USE_FSDP") == "true":  # FSDP on CPU ranks: accelerate would not turn it on
    runpy.run_path(str(Path(__file__).with_name("fsdp_on_cpu.py")), run_name="fsdp_on_cpu")

import vlm_rl.training.trainer as trainer_module  # noqa: E402
from vlm_rl.algorithms.advantages import whiten  # noqa: E402
from vlm_rl.errors import run_command  # noqa: E402
from vlm_rl.launch import start_process  # noqa: E402
from vlm_rl.ppo import build_trainer, parse_args  # noqa: E402
from vlm_rl.models.sharding import gathered_parameters  # noqa: E402

RUN = {}  # the output directory and rank, for the exit record


def full_weights_checksum(trainer) -> float:
    """The sum of every weight of the policy and critic, gathered whole on this rank whatever the engine."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if trainer.accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        tensors = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).values()  # on every rank
        return sum(float(t.detach().double().sum()) for t in tensors)
    with gathered_parameters(model, trainer.accelerator):
        return sum(float(p.detach().double().sum()) for p in model.parameters())


def rounds_needed_alone(trainer) -> int:
    """The rounds of dynamic sampling this rank alone would need at iteration 0 with the reward
    `trainer_helpers.colour_questions_only` (whose groups with signal are the colour questions')."""
    wanted, kept = trainer.args.local_batch_size // trainer.args.num_generations, 0
    for r in range(trainer.args.max_sampling_rounds):
        kept += sum(s["task"] == "colour" for s in trainer.batch_samples(0, round=r)[:: trainer.args.num_generations])
        if kept >= wanted:
            return r + 1
    return trainer.args.max_sampling_rounds


def main(argv: list[str]) -> None:
    start_process("ppo")  # as vlm_rl.ppo.main: warnings from the main process only
    config = parse_args(argv)
    torch.set_num_threads(1)
    trainer = build_trainer(config)
    if os.environ.get("EOS_BIAS"):  # multi-turn launches: the random tiny model ends each turn after a token or two
        trainer.generation_config.sequence_bias = {(trainer.eos_ids[0],): float(os.environ["EOS_BIAS"])}
    rank = trainer.accelerator.process_index
    RUN.update(output_dir=config.output_dir, rank=rank)
    first_sources = [s["_source"] for s in trainer.batch_samples(0)]
    scored, score = [], trainer.score

    def recording_score(rollout, samples, **kwargs):
        out = score(rollout, samples, **kwargs)
        scored.append({"scores": out["scores"].tolist(), "unscored": out["unscored"].tolist()})
        return out

    trainer.score = recording_score
    trainer.train()
    trainer.score = score
    checksum = full_weights_checksum(trainer)
    samples, rollout, last = trainer.sample(0)  # steps 1-3 (with dynamic sampling: its rounds)
    whitened_rewards = []  # what whiten_rewards made of the shaped rewards (advantages are whitened with shift_mean)

    def recording_whiten(x, mask, shift_mean=True, all_reduce_sum=None):
        out = whiten(x, mask, shift_mean, all_reduce_sum)
        if not shift_mean:
            whitened_rewards.append(out.tolist())
        return out

    trainer_module.whiten = recording_whiten
    old = trainer.advantages(rollout, last)
    trainer_module.whiten = whiten
    out = Path(config.output_dir) / f"rank{rank}.json"
    out.write_text(json.dumps({
        "rank": rank, "world": trainer.accelerator.num_processes, "sources": first_sources, "checksum": checksum,
        "num_prompts": len(trainer.train_dataset), "scored": scored,
        "advantages": old["advantages"].tolist(), "train_mask": old["train_mask"].tolist(), "whitened_rewards": whitened_rewards,
        "sample_sources": [s["_source"] for s in samples], "scores": old["scores"].tolist(),
        "dynamic_sampling": last["dynamic_sampling"].tolist() if "dynamic_sampling" in last else None,
        "rounds_needed_alone": rounds_needed_alone(trainer) if config.dynamic_sampling else None,
    }))  # fmt: skip


def record_exit() -> None:
    """How the process is left once the command has returned (run at exit: a finished rank exits in run_command)."""
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    (Path(RUN["output_dir"]) / f"rank{RUN['rank']}_exit.json").write_text(json.dumps({
        "process_group": dist.is_initialized(), "threads": threads,
        "handlers": [signal.getsignal(s) == signal.SIG_DFL or signal.getsignal(s) == signal.default_int_handler for s in (signal.SIGTERM, signal.SIGINT)],
    }))  # fmt: skip


atexit.register(record_exit)
run_command("ppo", main, sys.argv[1:])
