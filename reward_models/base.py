r"""The reward interface, the registry of built-in rewards, and `load_reward("spec")`.

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

Spec syntax (``load_reward`` / ``load_rewards``)
------------------------------------------------
::

    SPEC  := BASE [":" WEIGHT]
    BASE  := NAME ["(" ARGS ")"]                 built-in reward:      exact_match, format(pattern=^\w+$)
           | MODULE ":" ATTR ["(" ARGS ")"]      importable callable:  my_pkg.rewards:brevity
           | DIRECTORY                           trained reward model: runs/rm (holds reward_config.json)
           | http[s]://HOST:PORT[/PREFIX]        reward server:        http://127.0.0.1:8000
    ARGS  := KEY "=" VALUE {"," KEY "=" VALUE}
    WEIGHT:= a decimal number: 2, 0.5, -1, 1e-3

* **Built-in names**: ``exact_match``, ``contains_answer``, ``format``, ``length`` (see
  :mod:`reward_models.rules`); ``-`` and ``_`` are interchangeable (``exact-match``).
* **ARGS** become keyword arguments of the reward's constructor (or of the factory named by
  ``MODULE:ATTR``). A VALUE in single or double quotes is taken verbatim (no escapes; use it when
  the value contains ``,KEY=``, or to force a string). An unquoted VALUE is stripped and read as
  ``true``/``false`` (bool), ``none``/``null`` (None), an int, a float, or else the literal text, so
  regexes need no escaping: ``format(pattern=^\d{1,3}(,\d{3})*$)``. The argument list runs from the
  first ``(`` to the final ``)``; arguments are separated by commas that are followed by ``KEY=``.
  The special argument ``name=...`` renames the reward (for metric names) when the constructor
  does not take ``name`` itself.
* **MODULE:ATTR** imports ``MODULE`` and looks up ``ATTR`` (dots allowed for nested attributes).
  Without ARGS: a class is instantiated with no arguments, anything else callable is the reward
  itself. With ARGS: ``ATTR`` is called with them and the result is the reward.
* **DIRECTORY**: a directory holding ``reward_config.json`` is a trained reward model, loaded with
  ``reward_models.vlm_reward.VLMRewardModel.from_pretrained(path)`` (imported only then).
  Built-in names win over same-named directories: write ``./length`` for a directory called ``length``.
* **URL**: :class:`reward_models.remote.RemoteReward` posting to ``URL/score``.
* **WEIGHT**: only a *trailing* ``:<number>`` is a weight. In a URL, a number right after the host
  is the port, so a weighted URL spells both: ``http://127.0.0.1:8000:0.5``. A spec that names an
  existing path as a whole is never split. ``load_rewards`` uses the weight in the weighted sum;
  ``load_reward`` returns a reward whose scores are multiplied by it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import os
import re
import sys
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
    "available_rewards",
    "completion_text",
    "completion_texts",
    "load_reward",
    "load_rewards",
    "parse_args",
    "reward_columns",
    "register_reward",
    "split_weight",
    "validate_scores",
]

REWARD_CONFIG_NAME = "reward_config.json"
BUILTIN_REWARDS = ("exact_match", "contains_answer", "format", "length")

class RewardSpecError(UserError, ValueError):
    """A reward spec that names no loadable reward (unknown name, bad arguments, module or attribute not found)."""


class RewardOutputError(ValueError):
    """A reward returned something that is not one score (float or None) per completion."""


class Reward:
    """Base class of reward objects: a ``name`` and TRL's reward-function ``__call__``.

    Subclasses set ``name`` (class attribute or in ``__init__``) and implement ``__call__``.
    ``__name__`` mirrors ``name`` so that code written for plain functions (TRL reads
    ``reward_func.__name__``) works with instances too.
    """

    name: str = "reward"
    # Dataset columns the reward reads from kwargs; data checks (`vlm-rl validate-data`) require them up front.
    required_columns: tuple[str, ...] = ()

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


def _ensure_builtins() -> None:
    import reward_models.rules  # noqa: F401  (registers the built-in rewards)


def available_rewards() -> list[str]:
    """The registered reward names (built-ins and anything added with ``register_reward``)."""
    _ensure_builtins()
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------

_WEIGHT_RE = re.compile(r"^(?P<base>.+):(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$", re.S)
_URL_RE = re.compile(r"^https?://", re.I)
_CALL_RE = re.compile(r"^(?P<target>[^()]+?)\s*(?:\((?P<args>.*)\))?$", re.S)
_MODULE_ATTR_RE = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_ARG_RE = re.compile(
    r"""\s*(?P<key>[A-Za-z_]\w*)\s*=\s*"""
    r"""(?P<value>"[^"]*"|'[^']*'|.*?)\s*"""
    r"""(?:,(?=\s*[A-Za-z_]\w*\s*=)|$)""",
    re.S,
)


def split_weight(spec: str) -> tuple[str, float]:
    """Split a trailing ``:<number>`` weight off ``spec``: ``"exact_match:0.5" -> ("exact_match", 0.5)``.

    Without a weight, the weight is 1.0. A URL's ``:PORT`` right after the host is not a weight
    (``http://h:8000`` has weight 1; ``http://h:8000:2`` has weight 2); a spec naming an existing
    path is never split.
    """
    spec = spec.strip()
    m = _WEIGHT_RE.match(spec)
    if m is None or os.path.exists(spec):
        return spec, 1.0
    base = m.group("base")
    if _URL_RE.match(base):
        rest = re.sub(r"^\[[^\]]*\]", "", base.split("://", 1)[1])  # drop a bracketed IPv6 host
        if "/" not in rest and ":" not in rest:
            return spec, 1.0  # the number is the port
    return base, float(m.group("weight"))


def _parse_value(text: str) -> Any:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    low = text.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_args(text: str) -> dict[str, Any]:
    """Parse the ``KEY=VALUE, ...`` argument list of a spec (see the module docstring)."""
    text = text.strip()
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        m = _ARG_RE.match(text, pos)
        if m is None or m.end() == pos:
            raise RewardSpecError(f"cannot parse reward arguments {text!r} at {text[pos:]!r}: expected KEY=VALUE")
        key = m.group("key")
        if key in args:
            raise RewardSpecError(f"reward argument {key!r} given twice in {text!r}")
        args[key] = _parse_value(m.group("value"))
        pos = m.end()
    return args


def _accepted_forms() -> str:
    return (
        "accepted reward specs: a built-in name, optionally with arguments "
        f"({', '.join(available_rewards())}; e.g. 'exact_match', 'format(pattern=^\\w+$)'), "
        "'module.path:callable', a reward-model directory holding reward_config.json, "
        "or a reward server URL 'http://host:port'; any of them may end in ':WEIGHT' (e.g. 'exact_match:0.5')"
    )


def _call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> Any:
    rename = None
    if "name" in kwargs:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "name" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            rename = kwargs.pop("name")
    try:
        obj = factory(**kwargs)
    except TypeError as e:
        try:
            sig = f"{what}{inspect.signature(factory)}"
        except (TypeError, ValueError):
            sig = what
        raise RewardSpecError(f"bad arguments {kwargs} for reward {what!r}: {e}. Signature: {sig}") from e
    if rename is not None:
        if isinstance(obj, Reward):
            obj.name = str(rename)
        else:
            obj = FunctionReward(obj, name=str(rename))
    return obj


def _load_module_attr(module: str, attr: str, args: str | None, spec: str) -> Reward:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:  # a console script's sys.path lacks the current directory
        sys.path.append(cwd)
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise RewardSpecError(f"reward spec {spec!r}: cannot import module {module!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise RewardSpecError(f"reward spec {spec!r}: module {module!r} has no attribute {attr!r}") from e
    if args is not None:
        obj = _call_factory(obj, parse_args(args), f"{module}:{attr}")
    elif inspect.isclass(obj):
        obj = _call_factory(obj, {}, f"{module}:{attr}")
    if not callable(obj):
        raise RewardSpecError(f"reward spec {spec!r} names a {type(obj).__name__}, which is not callable")
    return as_reward(obj)


def _load_reward_model_dir(path: str) -> Reward:
    try:
        module = importlib.import_module("reward_models.vlm_reward")
    except ModuleNotFoundError as e:
        if e.name in ("reward_models.vlm_reward", "reward_models"):
            raise ImportError(
                f"{path!r} is a trained reward model (it holds {REWARD_CONFIG_NAME}), but this install "
                "has no reward_models.vlm_reward module to load it with"
            ) from e
        raise ImportError(f"loading the reward model in {path!r} needs a missing package: {e}") from e
    except ImportError as e:
        raise ImportError(f"cannot import reward_models.vlm_reward to load the reward model in {path!r}: {e}") from e
    cls = getattr(module, "VLMRewardModel", None)
    if cls is None:
        raise ImportError(f"reward_models.vlm_reward has no VLMRewardModel; cannot load the reward model in {path!r}")
    return as_reward(cls.from_pretrained(path))


def load_reward(spec: str | Callable[..., Any]) -> Reward:
    """Build the reward that ``spec`` names (grammar in the module docstring).

    A callable is returned as a reward (see :func:`as_reward`). A spec with a weight gives a
    :class:`ScaledReward`. Unknown specs raise RewardSpecError (a ValueError) listing the accepted forms.
    """
    if not isinstance(spec, str):
        if callable(spec):
            return as_reward(spec)
        raise TypeError(f"a reward spec must be a string or a callable, got {type(spec).__name__}")
    base, weight = split_weight(spec)
    reward = _load_unweighted(base)
    return reward if weight == 1.0 else ScaledReward(reward, weight)


def _load_unweighted(spec: str) -> Reward:
    spec = spec.strip()
    if not spec:
        raise RewardSpecError("empty reward spec; " + _accepted_forms())
    if _URL_RE.match(spec):
        from reward_models.remote import RemoteReward

        return RemoteReward(spec)
    _ensure_builtins()
    m = _CALL_RE.match(spec)
    if m is not None:
        target, args = m.group("target").strip(), m.group("args")
        if _NAME_RE.fullmatch(target) and _key(target) in _REGISTRY:
            return as_reward(_call_factory(_REGISTRY[_key(target)], parse_args(args or ""), _key(target)))
        mm = _MODULE_ATTR_RE.match(target)
        if mm is not None:
            return _load_module_attr(mm.group("module"), mm.group("attr"), args, spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, REWARD_CONFIG_NAME)):
            return _load_reward_model_dir(spec)
        raise RewardSpecError(
            f"directory {spec!r} is not a trained reward model: it has no {REWARD_CONFIG_NAME}; " + _accepted_forms()
        )
    hint = ""
    if m is not None and _NAME_RE.fullmatch(m.group("target").strip()):
        close = difflib.get_close_matches(_key(m.group("target").strip()), available_rewards(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    elif os.sep in spec or spec.startswith("."):
        hint = " (no such directory)"
    raise RewardSpecError(f"unknown reward spec {spec!r}{hint}; " + _accepted_forms())


def reward_columns(specs: str | Sequence[str]) -> dict[str, str]:
    """{column: "needed by reward NAME"} for the dataset columns the rewards in ``specs`` read, without
    loading a model or calling a server: trained reward models and URLs read no columns of their own."""
    _ensure_builtins()
    specs = [specs] if isinstance(specs, str) else list(specs)
    columns: dict[str, list[str]] = {}
    for spec in specs:
        base = split_weight(spec)[0].strip()
        m = _CALL_RE.match(base)
        target = m.group("target").strip() if m is not None else ""
        cheap = (_NAME_RE.fullmatch(target) and _key(target) in _REGISTRY) or _MODULE_ATTR_RE.match(target)
        if not cheap and (_URL_RE.match(base) or os.path.isfile(os.path.join(base, REWARD_CONFIG_NAME))):
            continue  # a server or a trained reward model: only the run itself asks or loads it
        reward = _load_unweighted(base)  # a bad spec fails here, before anything loads
        for column in getattr(reward, "required_columns", ()):
            columns.setdefault(column, []).append(reward.name)
    return {c: f"needed by reward {', '.join(names)}" for c, names in columns.items()}


def load_rewards(specs: str | Sequence[str | Callable[..., Any]]) -> CombinedReward:
    """Load several rewards (each spec may carry ``:WEIGHT``) into a :class:`CombinedReward`."""
    if isinstance(specs, str) or callable(specs):
        specs = [specs]
    rewards, weights = [], []
    for spec in specs:
        if isinstance(spec, str):
            base, weight = split_weight(spec)
            rewards.append(_load_unweighted(base))
            weights.append(weight)
        else:
            rewards.append(load_reward(spec))
            weights.append(1.0)
    return CombinedReward(rewards, weights)
