"""`vlm-rl ppo` / `accelerate launch scripts/ppo.py`: build everything from a PPOConfig and train."""

from __future__ import annotations

import sys

from vlm_rl.arguments import parse_config
from vlm_rl.launch import start_process
from vlm_rl.quiet import disable_progress_bars
from vlm_rl.training.output_dir import refuse_previous_run
from vlm_rl.training.config import PPOConfig
from vlm_rl.models.critic import CRITIC_DIR, load_critic
from vlm_rl.data.bad_rows import BadRows, write_skipped_rows
from vlm_rl.data.formats import load_samples
from vlm_rl.models.loading import image_resize, load_policy_and_reference, load_processor
from vlm_rl.training.preemption import Preempted
from vlm_rl.data.synthetic import resolve_data_path
from vlm_rl.training.trainer import PPOTrainer
from vlm_rl.data.validate import check_data
from vlm_rl.training.trl_names import translate_trl_names


def build_trainer(config: PPOConfig) -> PPOTrainer:
    """Policy, reference, value head, processor, reward and data for `config`, wired into a PPOTrainer."""
    from accelerate import PartialState
    from transformers import set_seed

    from reward_models.registry import load_rewards
    from vlm_rl.models.tiny import resolve_model_path

    if config.disable_tqdm:  # transformers' "Loading weights" and "Writing model shards" bars too
        disable_progress_bars()
    with PartialState().main_process_first():  # rank 0 builds the embedded defaults; the others then read them
        model_path = resolve_model_path(config.model_name_or_path)
        data_path = resolve_data_path(config.train_data, config.train_split)
        eval_path = resolve_data_path(config.eval_data, config.eval_split) if config.eval_data else None
    config.model_name_or_path = model_path
    if not (config.overwrite_output_dir or config.resume_from_checkpoint):
        refuse_previous_run(config.output_dir)  # before any model loads
    processor = load_processor(model_path, config.min_pixels, config.max_pixels)
    resize = image_resize(model_path, processor)
    train_bad, eval_bad = check_prompt_data(config, processor, [(data_path, config.train_split), (eval_path, config.eval_split)], resize)
    if PartialState().is_main_process:
        write_skipped_rows(config.output_dir, [train_bad, eval_bad])
    set_seed(config.seed)  # what is initialised fresh (a LoRA adapter, a value head) is the same on every engine
    policy, reference = load_policy_and_reference(config)
    critic = load_critic(config, policy, model_path)  # None for the critic-free estimators
    read = dict(column_map=config.column_map, resize=resize)
    dataset = load_samples(data_path, split=config.train_split, skip=train_bad.sources, **read)
    eval_dataset = load_samples(eval_path, split=config.eval_split, skip=eval_bad.sources, **read) if eval_path else None
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


def check_prompt_data(config: PPOConfig, processor, sources: list[tuple[str | None, str]], resize=None) -> list[BadRows]:
    """Every row of the prompt data ((path, split) pairs) checked before the policy loads: readable, images opened,
    placeholders counted, prompt lengths against max_prompt_length, the columns the rewards read (a reward server is
    asked then). A DataError lists every problem; with skip_bad_rows, the bad rows of each source are returned."""
    from reward_models.registry import reward_columns

    columns = reward_columns(config.reward)
    bad = []
    for path, split in sources:
        if path is None:
            bad.append(BadRows("", 0))
            continue
        report = check_data(
            path, "ppo", processor=processor, max_prompt_length=config.max_prompt_length, required_columns=columns,
            skip_long_prompts=config.skip_long_prompts, split=split, column_map=config.column_map, resize=resize,
        )
        bad.append(report.rows_to_skip(config.skip_bad_rows, config.max_bad_row_fraction))
    return bad


def what_was_saved(trainer: PPOTrainer) -> str:
    """The final model's parts, as the last line names them: the policy, its critic if it has one, the processor."""
    critic = trainer.accelerator.unwrap_model(trainer.model_wrapped).critic
    if critic is None:  # the critic-free estimators
        return "policy and processor"
    return "policy, value head and processor" if critic.mode == "shared" else f"policy, {critic.mode} critic ({CRITIC_DIR}/) and processor"


def parse_args(argv: list[str]) -> PPOConfig:
    """`vlm-rl ppo`'s flags and `--config` YAML (TRL GRPOConfig's names and `--recipe` too) -> its PPOConfig."""
    return parse_config(PPOConfig, argv, "vlm-rl ppo", translate=translate_trl_names, repeatable=["--reward"])


def main(argv: list[str] | None = None) -> None:
    start_process("ppo")
    config = parse_args(sys.argv[1:] if argv is None else argv)
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
        print(f"PPO done: {trainer.state.global_step} iterations; {what_was_saved(trainer)} in {config.output_dir}")


if __name__ == "__main__":
    from vlm_rl.errors import run_command

    run_command("ppo", main, sys.argv[1:])
