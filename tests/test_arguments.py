"""Flags and `--config` YAML -> a config (vlm_rl/arguments.py): every unknown name is one line naming it and the
closest field, exit 2; values from the file are defaults the flags override; `--help` lists `--config` and the
command's own fields first; a translation step can sit in front of the check."""

from __future__ import annotations

import pytest
from cli_helpers import user_error

from vlm_rl.arguments import parse_config
from vlm_rl.cli import main as cli_main
from vlm_rl.errors import UserError
from vlm_rl.training.config import PPOConfig


def nowhere(tmp_path) -> list[str]:
    """Flags that make a run stop at once, were a broken check to let it through (nothing written in the checkout)."""
    return ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(tmp_path / "no-model")]


@pytest.mark.parametrize(
    "command, flag, closest",
    [("ppo", "--kl_coeff", "--kl_coef"), ("sft", "--lerning_rate", "--learning_rate"), ("train-reward", "--lora_rank", "--lora_r")],
)
def test_an_unknown_flag_is_one_line_naming_it_and_the_closest_field(tmp_path, capsys, command, flag, closest):
    err = user_error(capsys, [command, flag, "0.1", *nowhere(tmp_path)])
    assert err == f"vlm-rl {command}: error: unknown flag or key: {flag} (did you mean {closest}?). `vlm-rl {command} --help` lists them"


def test_an_abbreviated_flag_is_unknown_not_guessed(tmp_path, capsys):
    err = user_error(capsys, ["ppo", "--learning_rat", "1e-5", *nowhere(tmp_path)])
    assert "unknown flag or key: --learning_rat (did you mean --learning_rate?)" in err


def test_an_unknown_yaml_key_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "ppo.yaml"
    config.write_text(f"model_name_or_path: {tmp_path / 'no-model'}\noutput_dir: {tmp_path / 'run'}\nnum_ppo_epoch: 2\n")
    err = user_error(capsys, ["ppo", "--config", str(config)])
    assert f"'num_ppo_epoch' in {config}, line 3 (did you mean 'num_ppo_epochs'?)" in err


@pytest.mark.parametrize("command", ["ppo", "sft", "train-reward"])
def test_a_missing_config_file_is_named(tmp_path, capsys, command):
    err = user_error(capsys, [command, "--config", str(tmp_path / "nope.yaml"), *nowhere(tmp_path)])
    assert err == f"vlm-rl {command}: error: --config {tmp_path / 'nope.yaml'}: no such file"


@pytest.mark.parametrize(
    "text, error",
    [("a: [1\n", "line 2: not valid YAML"), ("- a\n- b\n", "a mapping of FIELD: VALUE lines, not a list"), ("seed: 1\nseed: 2\n", "line 2: 'seed' given twice (also line 1)")],
)
def test_a_config_file_that_is_no_mapping_of_fields_is_named(tmp_path, capsys, text, error):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert error in user_error(capsys, ["ppo", "--config", str(config), *nowhere(tmp_path)])


def test_a_bad_value_is_one_line(capsys):  # (argparse stops at the value: nothing runs)
    assert "argument --kl_coef/--kl-coef: invalid float value: 'abc'" in user_error(capsys, ["ppo", "--kl_coef", "abc"])


def test_file_values_are_defaults_the_flags_override(tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text("learning_rate: 1e-5\nkl_coef: 0.3\nreward: [exact_match, length]\nenv:\n  VLM_RL_TEST_ENV: set\n")
    parsed = parse_config(PPOConfig, ["--config", str(config), "--kl_coef", "0.2", "--output_dir", str(tmp_path / "o")], "vlm-rl ppo")
    assert parsed.learning_rate == 1e-5 and parsed.kl_coef == 0.2 and parsed.reward == ["exact_match", "length"]
    import os

    assert os.environ.pop("VLM_RL_TEST_ENV") == "set"


def test_a_translation_step_sits_in_front_of_the_check(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("beta: 0.04\n")

    names = {"beta": "kl_coef", "epsilon": "cliprange"}

    def translate(argv: list[str], settings: dict) -> tuple[list[str], dict]:
        if "--use_vllm" in argv:
            raise UserError("--use_vllm: vlm-rl has no vLLM generation")
        argv = [f"--{names.get(a[2:], a[2:])}" if a.startswith("--") else a for a in argv]
        return argv, {names.get(k, k): v for k, v in settings.items()}

    parsed = parse_config(PPOConfig, ["--config", str(config), "--epsilon", "0.3", "--output_dir", str(tmp_path)], "vlm-rl ppo", translate=translate)
    assert parsed.kl_coef == 0.04 and parsed.cliprange == 0.3
    with pytest.raises(UserError, match="--use_vllm: vlm-rl has no vLLM generation"):
        parse_config(PPOConfig, ["--use_vllm", "true"], "vlm-rl ppo", translate=translate)


def test_ppo_help_lists_config_and_ppo_fields_first_without_the_refused_ones(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["ppo", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    assert text.startswith("usage: vlm-rl ppo [--config FILE] [--FIELD VALUE ...]") and "  --config FILE" in text
    assert text.index("--config FILE") < text.index("vlm_rl PPOConfig:") < text.index("--kl_coef") < text.index("transformers TrainingArguments:")
    assert text.index("vlm_rl PPOConfig:") < text.index("--max_steps") < text.index("transformers TrainingArguments:")  # PPO's meaning
    assert "--push_to_hub" not in text and "--eval_strategy" not in text and "inherited fields this command does not use" in text
