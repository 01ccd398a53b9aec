"""`vlm-rl ppo` / `accelerate launch scripts/ppo.py`: build everything from a PPOConfig and train."""

from __future__ import annotations

import sys

from vlm_rl.training.output_dir import refuse_previous_run
from vlm_rl.training.config import PPOConfig
from vlm_rl.models.critic import load_critic
from vlm_rl.data.formats import load_samples
from vlm_rl.models.loading import load_policy_and_reference, load_processor
from vlm_rl.training.preemption import Preempted
from vlm_rl.data.synthetic import resolve_data_path
from vlm_rl.training.trainer import PPOTrainer
from vlm_rl.data.validate import check_data
from vlm_rl.training.trl_names import TrlNamesParser


def build_trainer(config: PPOConfig) -> PPOTrainer:
    """Policy, reference, value head, processor, reward and data for `config`, wired into a PPOTrainer."""
    from accelerate import PartialState
    from transformers import set_seed

    from reward_models.registry import load_rewards
    from vlm_rl.models.tiny import resolve_model_path

    with PartialState().main_process_first():  # rank 0 builds the embedded defaults; the others then read them
        model_path = resolve_model_path(config.model_name_or_path)
        data_path = resolve_data_path(config.train_data, config.train_split)
        eval_path = resolve_data_path(config.eval_data, config.eval_split) if config.eval_data else None
    config.model_name_or_path = model_path
    if not (config.overwrite_output_dir or config.resume_from_checkpoint):
        refuse_previous_run(config.output_dir)  # before any model loads
    processor = load_processor(model_path, config.min_pixels, config.max_pixels)
    check_prompt_data(config, processor, [(data_path, config.train_split), (eval_path, config.eval_split)])
    set_seed(config.seed)  # what is initialised fresh (a LoRA adapter, a value head) is the same on every engine
    policy, reference = load_policy_and_reference(config)
    critic = load_critic(config, policy, model_path)  # None for the critic-free estimators
    dataset = load_samples(data_path, split=config.train_split)
    eval_dataset = load_samples(eval_path, split=config.eval_split) if eval_path else None
    return PPOTrainer(
        args=config,
        processing_class=processor,
        model=policy,
        ref_model=reference,
        reward=load_rewards(config.reward),
        train_dataset=dataset,
        critic=critic,
        eval_dataset=eval_dataset,
    )


def check_prompt_data(config: PPOConfig, processor, sources: list[tuple[str | None, str]]) -> None:
    """Every row of the prompt data ((path, split) pairs) checked before the policy loads: readable, images opened,
    placeholders counted, prompt lengths against max_prompt_length, the columns the rewards read. A DataError
    lists every problem."""
    from reward_models.registry import reward_columns

    columns = reward_columns(config.reward)
    for path, split in sources:
        if path is None:
            continue
        check_data(
            path, "ppo", processor=processor, max_prompt_length=config.max_prompt_length, required_columns=columns,
            skip_long_prompts=config.skip_long_prompts, split=split,
        ).raise_if_problems()


def merge_repeated_flag(argv: list[str], flag: str) -> list[str]:
    """`--reward a --reward b` -> `--reward a b`: argparse's nargs='+' would silently keep only the last one."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + [flag, *values] if values else rest


def main(argv: list[str] | None = None) -> None:
    argv = merge_repeated_flag(list(sys.argv[1:] if argv is None else argv), "--reward")
    # TRL GRPOConfig's names and the recipes translated before parsing (training/trl_names.py)
    (config,) = TrlNamesParser((PPOConfig,)).parse_args_and_config(args=argv)
    if config.torch_num_threads:
        import torch

        torch.set_num_threads(config.torch_num_threads)
    trainer = build_trainer(config)
    try:
        trainer.train()
    except Preempted as stopped:
        if trainer.is_world_process_zero():
            print(stopped, file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)
    if trainer.is_world_process_zero():
        print(f"PPO done: {trainer.state.global_step} iterations; policy, value head and processor in {config.output_dir}")


if __name__ == "__main__":
    from vlm_rl.errors import run_command

    run_command("ppo", main, sys.argv[1:])
