r"""The reward interface: what a reward is, how scores are checked and combined, and how a name is registered.

A reward is any callable with TRL's reward-function signature::

    reward(prompts, completions, **kwargs) -> list[float | None]

* ``prompts``: one chat-message list per sample, e.g.
  ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]``.
* ``completions``: one plain string per sample (TRL conversational completions, i.e. a list of
  ``{"role": "assistant", "content": str | [parts]}`` messages, are accepted too: see
  :func:`completion_text`).
* ``kwargs``: ``images`` (one list of RGB PIL images per sample) and the dataset's other columns,
  each a list with one entry per sample, e.g. ``answer=["red", "two"]``.
* The result has one entry per sample; ``None`` means "this reward cannot score this sample".

Every reward object has a ``name`` (used for metric and column names). Plain functions are wrapped
by :func:`as_reward` so that they get one (their ``__name__``).

Rewards are named by specs (``exact_match``, ``module:callable``, a reward-model directory, a server URL):
:mod:`reward_models.registry` turns a spec into a reward; ``register_reward`` adds a name to it.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vlm_rl.errors import UserError

__all__ = [
    "BUILTIN_REWARDS",
    "CombinedReward",
    "FunctionReward",
    "Reward",
    "RewardOutputError",
    "RewardSpecError",
    "ScaledReward",
    "as_reward",
    "completion_text",
    "completion_texts",
    "register_reward",
    "validate_scores",
]

REWARD_CONFIG_NAME = "reward_config.json"
BUILTIN_REWARDS = ("exact_match", "contains_answer", "format", "length")

class RewardSpecError(UserError, ValueError):
    """A reward spec that names no loadable reward (unknown name, bad arguments, module or attribute not found)."""


class RewardOutputError(UserError, ValueError):
    """A reward returned something that is not one score (float or None) per completion: a user error (the user's
    reward), named in one line."""


class Reward:
    """Base class of reward objects: a ``name`` and TRL's reward-function ``__call__``.

    Subclasses set ``name`` (class attribute or in ``__init__``) and implement ``__call__``.
    ``__name__`` mirrors ``name`` so that code written for plain functions (TRL reads
    ``reward_func.__name__``) works with instances too.
    """

    name: str = "reward"
    # Dataset columns the reward reads from kwargs; data checks (`vlm-rl validate-data`, PPO's start) require them in
    # every sample, and name the constructor option that chooses each one ({column: option}, e.g. answer_column).
    required_columns: tuple[str, ...] = ()
    column_options: dict[str, str] = {}

    def __call__(self, prompts: list | None, completions: list, **kwargs: Any) -> list[float | None]:
        raise NotImplementedError

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionReward(Reward):
    """Wraps a plain callable so that it has a ``name``."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"a reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or _callable_name(fn)
        self.required_columns = tuple(getattr(fn, "required_columns", ()))

    def __call__(self, prompts, completions, **kwargs):
        return self.fn(prompts, completions, **kwargs)


class ScaledReward(Reward):
    """``reward``'s scores multiplied by ``weight`` (None stays None); same name."""

    def __init__(self, reward: Callable[..., Any], weight: float):
        self.reward = as_reward(reward)
        self.weight = float(weight)
        self.name = self.reward.name
        self.required_columns = tuple(getattr(self.reward, "required_columns", ()))

    def __call__(self, prompts, completions, **kwargs):
        scores = validate_scores(self.name, self.reward(prompts, completions, **kwargs), len(completions))
        return [None if s is None else self.weight * s for s in scores]


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    inner = getattr(fn, "func", fn)  # functools.partial
    name = getattr(inner, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    if name == "<lambda>":
        return "lambda"
    return type(fn).__name__


def as_reward(obj: Any, name: str | None = None) -> Reward:
    """Return ``obj`` as a reward with a ``name``: reward objects as they are, callables wrapped."""
    if name is None and isinstance(obj, Reward):
        return obj
    if name is None and callable(obj) and isinstance(getattr(obj, "name", None), str) and obj.name:
        return obj  # duck-typed reward object
    return FunctionReward(obj, name=name)


# --------------------------------------------------------------------------------------------
# Completions as text
# --------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", "") or "")
    if isinstance(content, Sequence):
        return "".join(
            str(part.get("text", "") or "") if isinstance(part, Mapping) else str(part)
            for part in content
            if not (isinstance(part, Mapping) and part.get("type") not in (None, "text"))
        )
    raise TypeError(f"cannot read text from message content of type {type(content).__name__}")


def completion_text(completion: Any) -> str:
    """The text of one completion.

    A string is returned as it is. A TRL conversational completion (a list of messages, or one
    message dict) gives the text of its assistant messages (of all messages if none has role
    ``assistant``), joined with newlines; a content given as a list of parts contributes the
    ``text`` of its text parts, concatenated.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        if len(messages) != len(completion):
            raise TypeError("a conversational completion must be a list of message dicts")
        assistant = [m for m in messages if m.get("role") == "assistant"]
        return "\n".join(_content_text(m.get("content")) for m in (assistant or messages))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """:func:`completion_text` of each completion."""
    return [completion_text(c) for c in completions]


# --------------------------------------------------------------------------------------------
# Validation and combination
# --------------------------------------------------------------------------------------------


def validate_scores(name: str, scores: Any, n: int) -> list[float | None]:
    """Check that reward ``name`` returned one score per completion; return them as floats/None.

    Accepts lists, tuples and anything with ``tolist()`` (tensors, arrays). Each score must be
    None or a finite real number (bools and numpy/torch scalars are converted).
    """
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise RewardOutputError(
            f"reward {name!r} must return a list of scores (float or None), got {type(scores).__name__}"
        )
    if len(scores) != n:
        raise RewardOutputError(f"reward {name!r} returned {len(scores)} scores for {n} completions")
    out: list[float | None] = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        if not isinstance(s, numbers.Real) and hasattr(s, "item"):
            s = s.item()
        if not isinstance(s, numbers.Real):
            raise RewardOutputError(
                f"reward {name!r} returned {type(s).__name__} for sample {i}; expected a float or None"
            )
        s = float(s)
        if not math.isfinite(s):
            raise RewardOutputError(
                f"reward {name!r} returned {s} for sample {i}; return None for samples it cannot score"
            )
        out.append(s)
    return out


class CombinedReward(Reward):
    """Several rewards scored together: per-reward columns and their weighted sum.

    ``names`` are the rewards' names, made unique with ``_2``, ``_3``... suffixes. The combined
    score of a sample is ``sum(weight * score)`` over the rewards that scored it (a None score
    contributes nothing, as in TRL's GRPO ``nansum``); it is None only when every reward
    returned None for that sample.
    """

    name = "combined"

    def __init__(self, rewards: Sequence[Any], weights: Sequence[float] | None = None):
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        self.rewards = [as_reward(r) for r in rewards]
        weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.rewards):
            raise ValueError(f"got {len(weights)} weights for {len(self.rewards)} rewards")
        self.names: list[str] = []
        for r in self.rewards:
            base, k = r.name, 1
            name = base
            while name in self.names:
                k += 1
                name = f"{base}_{k}"
            self.names.append(name)
        self.weights: dict[str, float] = dict(zip(self.names, weights))
        self.required_columns = tuple(dict.fromkeys(c for r in self.rewards for c in getattr(r, "required_columns", ())))

    def score_all(self, prompts, completions, **kwargs) -> dict[str, list[float | None]]:
        """One validated score column per reward, keyed by its (unique) name."""
        columns = {}
        for name, reward in zip(self.names, self.rewards):
            try:
                raw = reward(prompts, completions, **kwargs)
            except Exception as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"(while computing reward {name!r})")
                raise
            columns[name] = validate_scores(name, raw, len(completions))
        return columns

    def combine(self, columns: Mapping[str, Sequence[float | None]]) -> list[float | None]:
        """The weighted sum of ``score_all``'s columns (see the class docstring for None)."""
        n = len(next(iter(columns.values())))
        out: list[float | None] = []
        for i in range(n):
            parts = [self.weights[k] * col[i] for k, col in columns.items() if col[i] is not None]
            out.append(math.fsum(parts) if parts else None)
        return out

    def score(self, prompts, completions, **kwargs) -> tuple[dict[str, list[float | None]], list[float | None]]:
        """``(score_all(...), combined)`` from a single pass over the rewards."""
        columns = self.score_all(prompts, completions, **kwargs)
        return columns, self.combine(columns)

    def combined(self, prompts, completions, **kwargs) -> list[float | None]:
        """The weighted sum only (same as calling the object)."""
        return self.combine(self.score_all(prompts, completions, **kwargs))

    __call__ = combined

    def __repr__(self) -> str:
        return f"CombinedReward({self.weights})"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Any]] = {}
_NAME_RE = re.compile(r"[A-Za-z_][\w-]*")


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a reward class (or a factory returning a reward) under ``name``.

    ``load_reward("name")`` / ``load_reward("name(k=v)")`` then call it with the keyword arguments.
    Registering another object under a taken name raises ValueError (re-registering the same
    class, e.g. on module reload, is allowed).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"reward names must be identifiers, got {name!r}")
    key = _key(name)

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        old = _REGISTRY.get(key)
        if old is not None and old is not factory and _qualname(old) != _qualname(factory):
            raise ValueError(f"a reward named {name!r} is already registered ({_qualname(old)})")
        _REGISTRY[key] = factory
        return factory

    return decorator


def _key(name: str) -> str:
    return name.replace("-", "_").lower()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def registered_reward(name: str) -> Callable[..., Any] | None:
    """The factory registered under `name` (``-``/``_`` and case do not matter), or None."""
    return _REGISTRY.get(_key(name)) if _NAME_RE.fullmatch(name) else None


def registered_names() -> list[str]:
    """Every registered reward name (the built-ins once :mod:`reward_models.registry` is imported)."""
    return sorted(_REGISTRY)
