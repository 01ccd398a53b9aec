"""Every TrainingArguments field PPO inherits is honoured, harmless or refused (vlm_rl/training/inherited_fields.py),
never silently ignored: a refused one set is one line naming what to use instead; `max_steps` counts iterations."""

from __future__ import annotations

import dataclasses

import pytest
from cli_helpers import user_error
from transformers import TrainingArguments
from trainer_helpers import completion_length, make_config, make_trainer

from vlm_rl.errors import ConfigError
from vlm_rl.training import config as config_module
from vlm_rl.training.config import PPOConfig, plan_batches
from vlm_rl.training.inherited_fields import HARMLESS, HONOURED, REFUSED


def test_every_inherited_field_is_placed_exactly_once():
    inherited = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    tables = {"honoured": HONOURED, "harmless": HARMLESS, "refused": REFUSED}
    placed = {name: [t for t, table in tables.items() if name in table] for name in inherited}
    assert {name: where for name, where in placed.items() if len(where) != 1} == {}
    assert set(HONOURED) | set(HARMLESS) | set(REFUSED) == set(inherited)  # nothing placed that does not exist


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--eval_strategy", "steps"], "eval_strategy='steps': PPO does not use it (PPO evaluates on --eval_data every --eval_steps"),
        (["--save_strategy", "epoch"], "save_strategy='epoch': PPO does not use it (PPO saves a checkpoint every --save_steps"),
        (["--push_to_hub"], "push_to_hub=True: PPO does not use it (vlm-rl runs offline"),
        (["--dataloader_num_workers", "4"], "dataloader_num_workers=4: PPO does not use it (PPO reads its prompts without a DataLoader)"),
        (["--max_steps", "2", "--total_episodes", "64"], "max_steps=2 and total_episodes=64 both set the run's length: give one"),
    ],
)
def test_a_field_ppo_does_not_use_is_refused_in_one_line(tmp_path, capsys, flags, says):
    nowhere = ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(tmp_path / "no-model")]  # were it let through
    assert says in user_error(capsys, ["ppo", *flags, *nowhere])


def test_defaults_and_harmless_fields_pass(tmp_path):
    config = PPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", do_train=True, logging_nan_inf_filter=False)
    assert config.remove_unused_columns is False and config.log_level_replica == "error"
    with pytest.raises(ConfigError, match="remove_unused_columns=True"):  # PPO's own default (False) is what counts
        PPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=True)


def test_progress_bars_only_where_a_terminal_shows_them(tmp_path, monkeypatch):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert PPOConfig(**settings).disable_tqdm is True  # pytest captures stdout: no terminal
    monkeypatch.setattr(config_module, "on_a_terminal", lambda: True)
    assert PPOConfig(**settings).disable_tqdm is False
    assert PPOConfig(**settings, disable_tqdm=True).disable_tqdm is True  # the user's choice stands


def test_max_steps_counts_ppo_iterations(tmp_path, tiny_model_dir, synthetic_data_dir):
    config = make_config(tmp_path, tiny_model_dir, synthetic_data_dir, total_episodes=None, max_steps=2)
    assert plan_batches(config, num_prompts=320, num_processes=1).num_total_batches == 2  # not the epoch's 40
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], total_episodes=None, max_steps=2)
    assert trainer.train().global_step == 2
