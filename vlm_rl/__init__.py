"""vlm-rl: PPO/RLHF for vision-language models. Importing it silences the library warnings a user cannot act on.

`from vlm_rl import PPOConfig, PPOTrainer, Reward, load_reward, load_rewards` works; each name is imported on first
use, so `import vlm_rl` stays light. The layout is in docs/design.md.
"""

from vlm_rl import quiet  # noqa: F401  (filters, vlm_rl/quiet.py)

_EXPORTS = {
    "PPOConfig": "vlm_rl.training.config",
    "PPOTrainer": "vlm_rl.training.trainer",
    "Reward": "reward_models.base",
    "register_reward": "reward_models.base",
    "load_reward": "reward_models.registry",
    "load_rewards": "reward_models.registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm_rl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
