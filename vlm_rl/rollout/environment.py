"""Environments: what answers a model turn in a multi-turn rollout.

An environment is any class with `reset(sample)` (the dataset row: its `prompt`, `images` and other columns) and
`step(text) -> Step` (the model's turn as text -> the observation, a reward for the turn, whether the episode is
over), and optionally `tools`, the functions whose schemas the chat template shows. One instance per sample and
rollout, made by calling the class with no arguments, so no state crosses samples or iterations (a resumed run
rebuilds them as the uninterrupted one did; an environment that draws random numbers draws them from the
process's RNG streams, which checkpoints save). `--environment module:Class` names one; `--tools` makes the
built-in `ToolEnvironment`, which runs the tool calls of each turn and ends the episode on a turn without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from vlm_rl.data.formats import ORIGINAL_IMAGES
from vlm_rl.errors import ConfigError
from vlm_rl.rollout.tool_calls import MalformedCall, parse_tool_calls
from vlm_rl.rollout.tools import call_tool, load_object, load_tools, tool_schema


@dataclass
class Step:
    """What the environment answers to a model turn. `observation`: the messages that follow the turn (tool messages,
    `{"role": "tool", "name": ..., "content": [parts]}`, or user messages), or a string (one user message);
    None or empty when `done`. `reward` counts into the return at the turn's last token."""

    observation: list[dict] | str | None = None
    reward: float = 0.0
    done: bool = False
    tool_calls: int = 0  # tool calls the turn made
    tool_errors: int = 0  # of those, the malformed or failed ones


@runtime_checkable
class Environment(Protocol):
    def reset(self, sample: dict) -> None: ...

    def step(self, text: str) -> Step: ...


@dataclass
class ToolEnvironment:
    """Runs the tool calls of each model turn; a turn without a tool call is the answer and ends the episode. A
    malformed call, an unknown tool or a tool that raises is an observation saying so (counted as a tool error).
    Tools that ask for `images` get the sample's images as the data holds them (before the processor's sizing: a
    zoom crops the full-resolution picture)."""

    tools: list[Callable]
    images: list = field(default_factory=list)

    def reset(self, sample: dict) -> None:
        self.images = list(sample.get(ORIGINAL_IMAGES) or sample.get("images") or [])  # what the data holds: full size

    def step(self, text: str) -> Step:
        calls = parse_tool_calls(text)
        if not calls:
            return Step(done=True)
        by_name = {t.__name__: t for t in self.tools}
        messages, errors = [], 0
        for call in calls:
            name = "invalid" if isinstance(call, MalformedCall) else call.name
            try:
                if isinstance(call, MalformedCall):
                    raise ValueError(call.error)
                if call.name not in by_name:
                    raise ValueError(f"there is no tool {call.name!r}; the tools are {', '.join(by_name)}")
                content = call_tool(by_name[name], call.arguments, self.images)
            except Exception as e:  # a bad call or a failing tool is the model's observation, not the run's end
                errors += 1
                content = [{"type": "text", "text": f"error: {e}"}]
            messages.append({"role": "tool", "name": name, "content": content})
        return Step(observation=messages, tool_calls=len(calls), tool_errors=errors)


def environment_factory(tools: str | None, environment: str | None) -> Callable[[], Any] | None:
    """A no-argument callable making one environment per sample (`PPOConfig.tools`/`environment`), or None for
    single-turn rollouts."""
    if tools and environment:
        raise ConfigError("tools and environment are exclusive: give the environment class its tools (a `tools` attribute)")
    if tools:
        loaded = load_tools(tools)
        return lambda: ToolEnvironment(loaded)
    if not environment:
        return None
    if ":" not in environment:
        raise ConfigError(f"environment: expected module:Class, got {environment!r}")
    cls = load_object(environment, "environment")
    if not callable(cls):
        raise ConfigError(f"environment: {environment!r} is not a class")
    try:
        instance = cls()
    except TypeError as e:
        raise ConfigError(f"environment: {environment!r} must be constructible without arguments: {e}") from e
    missing = [m for m in ("reset", "step") if not callable(getattr(instance, m, None))]
    if missing:
        raise ConfigError(f"environment: {environment!r} has no {' or '.join(missing)} method (reset(sample), step(text) -> Step)")
    for tool in getattr(instance, "tools", None) or []:
        tool_schema(tool)
    return cls


def tool_schemas(environment: Any) -> list[dict] | None:
    """The JSON schemas of an environment's tools, for the chat template; None without tools."""
    tools = getattr(environment, "tools", None)
    return [tool_schema(t) for t in tools] if tools else None


def as_step(result: Any) -> Step:
    """An environment's answer as a `Step`: a Step, or a tuple `(observation, reward, done)`."""
    if isinstance(result, Step):
        return result
    if isinstance(result, tuple) and len(result) == 3:
        observation, reward, done = result
        return Step(observation, float(reward), bool(done))
    raise TypeError(f"an environment's step must return a Step or (observation, reward, done), got {type(result).__name__}")

