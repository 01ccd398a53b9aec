"""Rewards importable by `load_reward("reward_spec_helpers:...")` in the reward tests."""

from __future__ import annotations

from reward_models.base import Reward


def brevity(prompts, completions, **kwargs):
    """1 / number of words (0 words -> 1.0)."""
    return [1.0 / max(1, len(c.split())) for c in completions]


class Constant(Reward):
    name = "constant"

    def __init__(self, value: float = 1.0):
        self.value = value

    def __call__(self, prompts, completions, **kwargs):
        return [self.value] * len(completions)


def make_constant(value: float = 1.0):
    return Constant(value)


not_callable = 42
