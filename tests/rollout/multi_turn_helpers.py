"""Environments with known behaviour for the multi-turn tests (loaded as `multi_turn_helpers:Class`)."""

from __future__ import annotations

import os

from vlm_rl.rollout.environment import Step
from vlm_rl.rollout.tools import zoom


class ZoomEveryTurn:
    """Whatever the model says, answers with a zoomed quarter of the sample's image (an image mid-conversation) and a
    reward of 0.5, for `turns - 1` turns, then ends the episode. `turns`: 3 on rank 0 of a launch and 1 on every other
    rank (ranks that take different numbers of turns), 3 outside a launch."""

    def __init__(self):
        self.turns = 3 if os.environ.get("RANK", "0") == "0" else 1
        self.images, self.taken = [], 0

    def reset(self, sample: dict) -> None:
        self.images, self.taken = list(sample["images"]), 0

    def step(self, text: str) -> Step:
        self.taken += 1
        if self.taken >= self.turns:
            return Step(reward=0.5, done=True)
        crop = zoom("top left" if self.taken % 2 else "bottom right", self.images)
        return Step(observation=[{"role": "tool", "name": "zoom", "content": [{"type": "image", "image": crop}, {"type": "text", "text": "zoomed"}]}], reward=0.5)


class Scripted:
    """Stands in for `generate_responses` (monkeypatched into vlm_rl.rollout.multi_turn): turn k of every row answers
    `turns[k]` (its tokens, then <|im_end|>), so a test knows which tokens the model wrote."""

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer = tokenizer
        self.turns = [tokenizer(t).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")] for t in turns]
        self.calls = 0

    def __call__(self, model, inputs, generation_config, **kwargs):
        import torch

        ids = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        return torch.tensor([ids] * inputs["input_ids"].shape[0], device=inputs["input_ids"].device)


ZOOM_CALL = '<tool_call>\n{"name": "zoom", "arguments": {"region": "top left"}}\n</tool_call>'
