"""Published GRPO-family recipes as PPOConfig settings: `--recipe dapo | dr_grpo | gspo` (or `recipe:` in a YAML).

A recipe sets the algorithm's fields only (estimator, loss, clipping, KL, sampling filters); the batch geometry
(num_generations, batch sizes, num_mini_batches) and the reward stay the user's, and any field given explicitly, in
the YAML or as a flag, overrides the recipe's value. Every recipe is critic-free GRPO with no KL term (kl_coef 0: no
reference model); kl_in_loss is set so that a KL added to it goes into the loss, as in TRL and verl.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_rl.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    settings: dict
    source: str
    left_out: str  # what the publication also used that the recipe does not set, and why


GRPO_BASE = {"advantage_estimator": "grpo", "kl_coef": 0.0, "kl_in_loss": True}

RECIPES = {
    "dapo": Recipe(
        settings={**GRPO_BASE, "loss_type": "dapo", "cliprange": 0.2, "epsilon_high": 0.28, "mask_truncated_completions": True,
                  "dynamic_sampling": True},
        source="Yu et al. 2025, DAPO (arXiv:2503.14476): clip-higher 0.2/0.28 (section 4.1), dynamic sampling, "
               "token-level loss, overlong filtering, no KL (section 2.3); TRL's paper index and verl's recipe/dapo",
        left_out="soft overlong punishment (a reward: add a length penalty to --reward); num_generations 16 and the batch sizes",
    ),
    "dr_grpo": Recipe(
        settings={**GRPO_BASE, "loss_type": "dr_grpo", "scale_rewards": "none"},
        source="Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO, arXiv:2503.20783): no length "
               "normalisation (token sum / a constant) and no std normalisation of the advantage, no KL; TRL's paper index",
        left_out="num_generations 8 and max_new_tokens 3000 (TRL's max_completion_length, dr_grpo's constant) of the paper's runs",
    ),
    "gspo": Recipe(
        settings={**GRPO_BASE, "importance_sampling_level": "sequence", "loss_type": "grpo", "cliprange": 3e-4, "epsilon_high": 4e-4},
        source="Zheng et al. 2025, Group Sequence Policy Optimization (arXiv:2507.18071v2), section 5.1: sequence-level "
               "ratios clipped to [1 - 3e-4, 1 + 4e-4], sequence-mean loss, no KL; TRL's paper index",
        left_out="4 mini-batches per rollout (TRL's steps_per_generation 4, here num_mini_batches: 4), which sets the batch size",
    ),
}


def recipe_settings(name: str) -> dict:
    """The PPOConfig fields recipe `name` sets; a ConfigError naming the known recipes for any other name."""
    if name not in RECIPES:
        raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return dict(RECIPES[name].settings)
