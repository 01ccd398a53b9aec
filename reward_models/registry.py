r"""Reward specs -> rewards: ``load_reward("spec")``, ``load_rewards([...])``, the columns rewards read.

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
* **URL**: :class:`reward_models.remote.RemoteReward` posting to ``URL/score``, named by the server
  (``/health``); loading it asks the server, so a server that is down is an error then, not at the first score.
* **WEIGHT**: only a *trailing* ``:<number>`` is a weight. In a URL, a number right after the host
  is the port, so a weighted URL spells both: ``http://127.0.0.1:8000:0.5``. A spec that names an
  existing path as a whole is never split. ``load_rewards`` uses the weight in the weighted sum;
  ``load_reward`` returns a reward whose scores are multiplied by it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from reward_models import rules  # noqa: F401  (registers the built-in rewards)
from reward_models.base import (
    REWARD_CONFIG_NAME,
    CombinedReward,
    FunctionReward,
    Reward,
    RewardSpecError,
    ScaledReward,
    as_reward,
    registered_names,
    registered_reward,
)
from vlm_rl.user_code import import_attribute


def available_rewards() -> list[str]:
    """The registered reward names (built-ins and anything added with ``register_reward``)."""
    return registered_names()


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z_][\w-]*")
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
    try:
        obj = import_attribute(module, attr)
    except ImportError as e:
        raise RewardSpecError(f"reward spec {spec!r}: cannot import module {module!r}: {e}") from e
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

        return RemoteReward(spec).connect()
    m = _CALL_RE.match(spec)
    if m is not None:
        target, args = m.group("target").strip(), m.group("args")
        factory = registered_reward(target)
        if factory is not None:
            return as_reward(_call_factory(factory, parse_args(args or ""), target.replace("-", "_").lower()))
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
        close = difflib.get_close_matches(m.group("target").strip().replace("-", "_").lower(), available_rewards(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    elif os.sep in spec or spec.startswith("."):
        hint = " (no such directory)"
    raise RewardSpecError(f"unknown reward spec {spec!r}{hint}; " + _accepted_forms())


def reward_columns(specs: str | Sequence[str]) -> dict[str, str]:
    """{column: who needs it, and the option that would choose another column} for the dataset columns the
    rewards in ``specs`` read (their ``required_columns``), without loading a model: a trained reward model reads
    no column of its own; a reward server is asked (``/health``), so one that is down is an error here."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    columns: dict[str, list[str]] = {}
    for spec in specs:
        base = split_weight(spec)[0].strip()
        m = _CALL_RE.match(base)
        target = m.group("target").strip() if m is not None else ""
        cheap = registered_reward(target) is not None or _MODULE_ATTR_RE.match(target)
        if not cheap and not _URL_RE.match(base) and os.path.isfile(os.path.join(base, REWARD_CONFIG_NAME)):
            continue  # a trained reward model: only the run itself loads it
        reward = _load_unweighted(base)  # a bad spec fails here, before anything loads
        options = getattr(reward, "column_options", {})
        for column in getattr(reward, "required_columns", ()):
            how = f" at {reward.url}" if _URL_RE.match(base) else ""
            if column in options:
                how += f"; {reward.name}({options[column]}=COLUMN) reads another column"
            columns.setdefault(column, []).append(reward.name + how)
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
