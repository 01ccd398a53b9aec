"""A YAML or command line written for TRL's GRPOConfig runs on `vlm-rl ppo` with the same meaning (TRL's own parser
reads the same file as the oracle); TRL fields vlm-rl does not implement are refused by name with what to do; recipes
sit beneath anything given explicitly."""

from __future__ import annotations

import pytest
import yaml
from trl import GRPOConfig, TrlParser

from vlm_rl.errors import ConfigError, run_command
from vlm_rl.training.config import PPOConfig
from vlm_rl.training.recipes import RECIPES, recipe_settings
from vlm_rl.ppo import parse_args
from vlm_rl.training.trl_names import translate_argv

# Every field the issue lists, each at a value other than both projects' defaults (max_prompt_length: TRL 1.16 has
# none, older TRL cut prompts to it; here it is the same limit, over which a prompt is an error).
TRL_YAML = {
    "beta": 0.04, "epsilon": 0.15, "epsilon_high": 0.27, "num_generations": 4, "num_iterations": 3, "loss_type": "bnpo",
    "scale_rewards": False, "max_completion_length": 24, "temperature": 0.9, "importance_sampling_level": "sequence",
    "mask_truncated_completions": True, "reward_weights": [1.0, 0.5], "delta": 1.6, "top_entropy_quantile": 0.5,
    "entropy_coef": 0.01, "learning_rate": 2e-6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
    # fields TRL has that vlm-rl accepts at the value that says what it does anyway
    "use_vllm": False, "top_p": 1.0, "top_k": 0,
}  # fmt: skip
COMMON = ["--output_dir", "out", "--use_cpu", "true", "--report_to", "none"]


def parse(tmp_path, mapping: dict | None, *flags: str) -> PPOConfig:
    argv = list(flags) + COMMON
    if mapping is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(mapping))
        argv = ["--config", str(path), *argv]
    return parse_args(argv)  # as `vlm-rl ppo` parses


def test_a_trl_grpo_yaml_means_the_same_here(tmp_path):
    config = parse(tmp_path, {**TRL_YAML, "reward": ["exact_match", "length"], "max_prompt_length": 300}, "--advantage_estimator", "grpo")
    trl_only = {k: v for k, v in TRL_YAML.items() if k not in ("max_prompt_length",)}
    (path := tmp_path / "trl.yaml").write_text(yaml.safe_dump(trl_only))
    (trl,) = TrlParser((GRPOConfig,)).parse_args_and_config(args=["--config", str(path), *COMMON, "--bf16", "false"])
    # TRL's own reading of the same file is the oracle, field by field
    assert (config.kl_coef, config.kl_in_loss, config.kl_estimator) == (trl.beta, True, "k3")  # TRL: beta x k3 in the loss
    assert config.cliprange == trl.epsilon
    assert config.epsilon_high == trl.epsilon_high and config.delta == trl.delta
    assert config.num_ppo_epochs == trl.num_iterations and config.max_new_tokens == trl.max_completion_length
    assert config.scale_rewards == trl.scale_rewards == "none"  # TRL's own mapping of false
    for shared in ("num_generations", "loss_type", "temperature", "importance_sampling_level", "mask_truncated_completions",
                   "top_entropy_quantile", "entropy_coef", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        assert getattr(config, shared) == getattr(trl, shared), shared
    assert config.reward == ["exact_match:1.0", "length:0.5"] and trl.reward_weights == [1.0, 0.5]
    assert config.max_prompt_length == 300
    # the loss it trains with is TRL's: the objective's fields are TRL's attributes of the same names
    objective = config.policy_objective
    assert (objective.kl_coef, objective.epsilon_low, objective.upper, objective.delta) == (trl.beta, trl.epsilon, trl.epsilon_high, trl.delta)
    assert objective.max_completion_length == trl.max_completion_length  # dr_grpo's constant


def test_trl_flags_on_the_command_line_mean_the_same(tmp_path):
    config = parse(tmp_path, None, "--advantage_estimator", "grpo", "--num_generations", "2", "--beta=0.02", "--epsilon", "0.3",
                   "--num_iterations", "2", "--max_completion_length", "12", "--scale_rewards", "batch", "--use_vllm", "false")
    assert (config.kl_coef, config.kl_in_loss, config.kl_estimator, config.cliprange) == (0.02, True, "k3", 0.3)
    assert (config.num_ppo_epochs, config.max_new_tokens, config.scale_rewards) == (2, 12, "batch")


@pytest.mark.parametrize(
    "field, value, advice",
    [
        ("use_vllm", True, "transformers' generate"),
        ("vllm_mode", "colocate", "transformers' generate"),
        ("steps_per_generation", 8, "num_mini_batches"),
        ("top_p", 0.9, "full distribution"),
        ("sync_ref_model", True, "reference stays"),
        ("log_completions", True, "num_sample_generations"),
        ("off_policy_mask_threshold", 0.5, "does not implement"),
    ],
)
def test_trl_fields_not_implemented_are_refused_by_name(tmp_path, field, value, advice):
    with pytest.raises(ConfigError, match=rf"{field} is TRL GRPOConfig's; .*{advice}"):
        parse(tmp_path, {field: value})
    with pytest.raises(ConfigError, match=rf"--{field} is TRL GRPOConfig's; .*{advice}"):
        parse(tmp_path, None, f"--{field}", str(value))


def test_the_cli_prints_the_refusal_and_exits_2(tmp_path, capsys):
    from vlm_rl import ppo

    with pytest.raises(SystemExit) as stopped:
        run_command("ppo", ppo.main, ["--use_vllm", "true", *COMMON])
    assert stopped.value.code == 2
    assert "vlm-rl ppo: error: --use_vllm is TRL GRPOConfig's; vlm-rl generates with transformers' generate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "mapping, flags, named",
    [
        ({"beta": 0.1, "kl_coef": 0.2}, (), "beta or kl_coef"),
        (None, ("--beta", "0.1", "--kl_in_loss", "false"), "--beta or --kl_in_loss"),
        ({"epsilon": 0.1, "cliprange": 0.2}, (), "epsilon is TRL's name for cliprange"),
        (None, ("--num_iterations", "2", "--num_ppo_epochs", "3"), "--num_iterations is TRL's name for --num_ppo_epochs"),
        ({"loss_type": "sapo"}, (), "TRL's sapo is not implemented"),
        ({"recipe": "ppo2"}, (), "recipe must be one of dapo, dr_grpo, gspo"),
        ({"recipe": "dapo"}, ("--recipe", "gspo"), "give one"),
    ],
)
def test_ambiguous_or_unknown_settings_are_errors_naming_them(tmp_path, mapping, flags, named):
    with pytest.raises(ConfigError, match=named):
        parse(tmp_path, mapping, *flags, "--num_generations", "2")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_sets_its_fields_beneath_what_is_given(tmp_path, name):
    settings = recipe_settings(name)
    alone = parse(tmp_path, None, "--recipe", name, "--num_generations", "4")
    assert {k: getattr(alone, k) for k in settings} == settings
    # a YAML value overrides the recipe, a flag overrides both
    config = parse(tmp_path, {"recipe": name, "cliprange": 0.1, "epsilon_high": 0.12}, "--epsilon_high", "0.15", "--num_generations", "4")
    assert (config.cliprange, config.epsilon_high) == (0.1, 0.15)
    assert {k: getattr(config, k) for k in settings if k not in ("cliprange", "epsilon_high")} == {
        k: v for k, v in settings.items() if k not in ("cliprange", "epsilon_high")
    }
    assert alone.uses_reference is False and alone.advantage_estimator == "grpo"


def test_translate_argv_leaves_other_flags_and_values_alone():
    argv = ["--reward", "a", "b:0.5", "--epsilon=0.1", "--mask_truncated_completions", "--recipe", "gspo", "--seed", "3"]
    assert translate_argv(argv) == (["--reward", "a", "b:0.5", "--cliprange", "0.1", "--mask_truncated_completions", "--seed", "3"], "gspo")


def test_vlm_rl_ppo_trains_from_a_trl_grpo_yaml(tmp_path, tiny_model_dir, synthetic_data_dir):
    # The whole command, as a user runs it: `vlm-rl ppo --config trl.yaml --advantage_estimator grpo`.
    import json

    from vlm_rl import ppo

    trl_yaml = {
        "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, "num_generations": 4, "num_iterations": 2, "loss_type": "dr_grpo",
        "scale_rewards": "batch", "max_completion_length": 6, "temperature": 1.0, "importance_sampling_level": "sequence",
        "mask_truncated_completions": False, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "use_vllm": False, "report_to": "none", "use_cpu": True, "torch_num_threads": 1,
    }  # fmt: skip
    (path := tmp_path / "trl.yaml").write_text(yaml.safe_dump(trl_yaml))
    out = tmp_path / "run"
    ppo.main(["--config", str(path), "--advantage_estimator", "grpo", "--model_name_or_path", str(tiny_model_dir),
              "--train_data", str(synthetic_data_dir / "train.jsonl"), "--reward", "trainer_helpers:completion_length",
              "--total_episodes", "16", "--output_dir", str(out)])
    saved = yaml.safe_load((out / "ppo_config.yaml").read_text())
    assert (saved["kl_coef"], saved["kl_in_loss"], saved["kl_estimator"], saved["cliprange"]) == (0.04, True, "k3", 0.2)
    assert (saved["num_ppo_epochs"], saved["max_new_tokens"], saved["loss_type"], saved["scale_rewards"]) == (2, 6, "dr_grpo", "batch")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2] and history[-1]["objective/kl"] != 0
