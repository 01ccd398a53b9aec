"""TRL GRPOConfig's field names on `vlm-rl ppo`: a YAML or command line written for TRL's GRPOTrainer runs here with the
same meaning (README: the GRPO family, TRL's names).

Before parsing, TRL's names that differ from PPOConfig's are translated (`RENAMED`, and `beta`: TRL's KL weight is in
the loss with k3, so it is kl_coef + kl_in_loss true + kl_estimator k3); TRL's fields that vlm-rl does not implement
are refused by name with what to do instead (a ConfigError); names TRL and PPOConfig share pass as they are. A
recipe (`--recipe NAME` or `recipe: NAME`, training/recipes.py) is expanded beneath the YAML's and the command line's
own values, so anything given explicitly overrides it.
"""

from __future__ import annotations

from dataclasses import fields
from functools import cache

from trl import GRPOConfig

from vlm_rl.arguments import FileValue
from vlm_rl.errors import ConfigError
from vlm_rl.training.config import PPOConfig
from vlm_rl.training.recipes import recipe_settings

# TRL's name -> PPOConfig's, same meaning.
RENAMED = {"epsilon": "cliprange", "num_iterations": "num_ppo_epochs", "max_completion_length": "max_new_tokens"}
BETA = "beta"  # TRL's KL weight, in the loss, estimated with k3
BETA_MEANS = {"kl_in_loss": "true", "kl_estimator": "k3"}  # besides kl_coef: the value
RECIPE = "recipe"

VLLM = "vlm-rl generates with transformers' generate on the training model (docs/gpu.md: vLLM's builds pin another torch); remove it"
SAMPLING = "vlm-rl samples from the full distribution at `temperature` (top_k 0, top_p 1, no penalties: the rollout's logprobs are that distribution's); remove it"
# TRL fields vlm-rl does not implement, with what to do instead (by prefix for families of fields); any other TRL-only
# field gets the generic advice.
ADVICE = {
    "vllm_": VLLM,
    "use_vllm": VLLM,
    "steps_per_generation": "use num_mini_batches: TRL's steps_per_generation = k x gradient_accumulation_steps is num_mini_batches: k here",
    "generation_batch_size": "the rollout is per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches per process; remove it",
    "top_p": SAMPLING,
    "top_k": SAMPLING,
    "min_p": SAMPLING,
    "repetition_penalty": SAMPLING,
    "generation_kwargs": SAMPLING,
    "log_completions": "use num_sample_generations: N samples per logging step, on the console and in wandb/trackio",
    "num_completions_to_print": "use num_sample_generations",
    "disable_dropout": "vlm-rl always disables dropout in the policy and the reference; remove it",
    "cast_lm_head_to_fp32": "vlm-rl always takes the log-softmax in fp32; remove it",
    "sync_ref_model": "the reference stays the model PPO started from; remove it",
    "ref_model_": "the reference stays the model PPO started from; remove it",
    "use_adaptive_entropy": "use a fixed entropy_coef",
    "entropy_coef_": "use a fixed entropy_coef",
    "entropy_target": "use a fixed entropy_coef",
    "multi_objective_aggregation": "rewards are summed with their weights and then normalised (TRL's default sum_then_normalize); remove it",
    "model_init_kwargs": "use model_name_or_path, and --bf16 for the dtype",
    "shuffle_dataset": "prompts are always shuffled, with a fixed order per epoch (resume replays it); remove it",
    "num_generations_eval": "evaluation samples each held-out prompt once (eval_data, eval_num_samples)",
}
GENERIC = "vlm-rl does not implement it; remove it (README: the GRPO family, TRL's names)"
# TRL-only fields whose value says what vlm-rl does anyway: accepted (and dropped) at that value.
WHAT_VLM_RL_DOES = {
    "use_vllm": False, "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0, "disable_dropout": True,
    "shuffle_dataset": True, "sync_ref_model": False, "use_adaptive_entropy": False, "log_completions": False,
    "multi_objective_aggregation": "sum_then_normalize", "steps_per_generation": None, "generation_batch_size": None,
}


@cache
def trl_only_fields() -> frozenset[str]:
    """TRL GRPOConfig's fields that PPOConfig has no field for and that are not renamed here."""
    ours = {f.name for f in fields(PPOConfig)}
    return frozenset(f.name for f in fields(GRPOConfig) if f.name not in ours and f.name not in RENAMED and f.name != BETA)


def is_what_vlm_rl_does(name: str, value) -> bool:
    """Whether TRL-only field `name` at `value` (from YAML, or a command-line string) asks for what vlm-rl does anyway."""
    if name not in WHAT_VLM_RL_DOES:
        return False
    expected = WHAT_VLM_RL_DOES[name]
    if expected is None or isinstance(expected, str):
        return str(value).lower() == str(expected).lower()
    if isinstance(expected, bool):
        return str(value).lower() == str(expected).lower()
    try:
        return float(value) == expected
    except (TypeError, ValueError):
        return False


def refusal(name: str, shown: str) -> ConfigError:
    """The error for TRL-only field `name`, shown as `shown` (a flag, or where in which file)."""
    advice = next((text for prefix, text in ADVICE.items() if name == prefix or (prefix.endswith("_") and name.startswith(prefix))), GENERIC)
    return ConfigError(f"{shown} is TRL GRPOConfig's; {advice}")


def translate_config(settings: dict[str, FileValue]) -> tuple[dict[str, FileValue], str | None]:
    """A YAML file's values with TRL's names -> (the same in PPOConfig's names, its recipe or None); each value keeps
    where it was given, for errors."""
    out, recipe = {}, settings[RECIPE].value if RECIPE in settings else None
    for name, given in settings.items():
        value, where = given.value, given.where
        if name == RECIPE:
            continue
        if name in trl_only_fields():
            if is_what_vlm_rl_does(name, value):
                continue
            raise refusal(name, f"{where}: {name}")
        if name == BETA:
            both = [n for n in ("kl_coef", *BETA_MEANS) if n in settings]
            if both:
                raise ConfigError(f"{where}: beta is TRL's KL weight in the loss (kl_coef with kl_in_loss true and kl_estimator k3); give beta or {', '.join(both)}, not both")
            out.update(kl_coef=FileValue(value, where), kl_in_loss=FileValue(True, where), kl_estimator=FileValue("k3", where))
            continue
        target = RENAMED.get(name, name)
        if target != name and target in settings:
            raise ConfigError(f"{where}: {name} is TRL's name for {target}; give one of them")
        out[target] = given
    return out, recipe


def translate_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """Command-line flags with TRL's names -> (the same in PPOConfig's names, the --recipe given or None)."""
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    out, recipe, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not name:
            out.append(arg)
            i += 1
            continue
        takes_value = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        value = inline if eq else argv[i + 1] if takes_value else None
        i += 1 + takes_value
        if name == RECIPE:
            recipe = value
        elif name in trl_only_fields():
            if not is_what_vlm_rl_does(name, "true" if value is None else value):  # a bare bool flag means true
                raise refusal(name, f"--{name}")
        elif name == BETA:
            if value is None:
                raise ConfigError("--beta needs a value: TRL's KL weight in the loss")
            both = [f"--{n}" for n in ("kl_coef", *BETA_MEANS) if n in given]
            if both:
                raise ConfigError(f"--beta is TRL's KL weight in the loss (--kl_coef with --kl_in_loss true --kl_estimator k3); give --beta or {', '.join(both)}, not both")
            out += ["--kl_coef", value, *[part for n, v in BETA_MEANS.items() for part in (f"--{n}", v)]]
        else:
            target = RENAMED.get(name, name)
            if target != name and target in given:
                raise ConfigError(f"--{name} is TRL's name for --{target}; give one of them")
            out += [f"--{target}"] + ([] if value is None else [value])
    return out, recipe


def translate_trl_names(argv: list[str], settings: dict[str, FileValue]) -> tuple[list[str], dict[str, FileValue]]:
    """`vlm-rl ppo`'s translation step (vlm_rl.arguments.parse_config): TRL's names in the flags and the YAML file
    rewritten to PPOConfig's, TRL-only fields refused by name, and a recipe's settings put beneath both."""
    argv, argv_recipe = translate_argv(argv)
    settings, file_recipe = translate_config(settings)
    if argv_recipe and file_recipe and argv_recipe != file_recipe:
        raise ConfigError(f"--recipe {argv_recipe} and recipe: {file_recipe} in the config file: give one")
    recipe = argv_recipe or file_recipe
    beneath = {name: FileValue(value, f"recipe {recipe}") for name, value in recipe_settings(recipe).items()} if recipe else {}
    return argv, {**beneath, **settings}
