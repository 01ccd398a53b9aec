"""The reward interface: spec parsing, load_reward's forms, the registry, validation, combination."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_models import base
from reward_models.base import CombinedReward, FunctionReward, Reward, RewardOutputError, ScaledReward, as_reward, completion_text, register_reward, validate_scores
from reward_models.registry import available_rewards, load_reward, load_rewards, parse_args, split_weight
from reward_models.remote import RemoteReward
from reward_models.rules import ContainsAnswer, ExactMatch, FormatReward, LengthReward

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]


@pytest.fixture()
def helpers(monkeypatch):
    """Make tests/reward_models/reward_spec_helpers.py importable whatever pytest's import mode."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return "reward_spec_helpers"


@pytest.fixture()
def isolated_registry():
    """Rewards a test registers are gone after it."""
    saved = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("exact_match", ("exact_match", 1.0)),
        ("exact_match:0.5", ("exact_match", 0.5)),
        ("exact_match:2", ("exact_match", 2.0)),
        ("length:-1e-1", ("length", -0.1)),
        ("format(pattern=^\\w+$):.5", ("format(pattern=^\\w+$)", 0.5)),
        ("format(pattern=^a:1$)", ("format(pattern=^a:1$)", 1.0)),
        ("pkg.mod:fn", ("pkg.mod:fn", 1.0)),
        ("pkg.mod:fn:3", ("pkg.mod:fn", 3.0)),
        ("pkg.mod:make(k=1):0.25", ("pkg.mod:make(k=1)", 0.25)),
        ("http://127.0.0.1:8000", ("http://127.0.0.1:8000", 1.0)),
        ("http://127.0.0.1:8000:0.5", ("http://127.0.0.1:8000", 0.5)),
        ("http://localhost:8000/rm:2", ("http://localhost:8000/rm", 2.0)),
        ("https://rm.example:443", ("https://rm.example:443", 1.0)),
        ("http://[::1]:8000", ("http://[::1]:8000", 1.0)),
        ("http://[::1]:8000:0.5", ("http://[::1]:8000", 0.5)),
        ("runs/rm:0.5", ("runs/rm", 0.5)),
    ],
)
def test_split_weight(spec, expected):
    assert split_weight(spec) == expected


def test_split_weight_keeps_existing_paths(tmp_path):
    weird = tmp_path / "rm:2"
    weird.mkdir()
    assert split_weight(str(weird)) == (str(weird), 1.0)


def test_parse_args():
    assert parse_args("") == {}
    assert parse_args(r"pattern=^\w+$") == {"pattern": r"^\w+$"}
    assert parse_args(r"pattern=^\d{1,3}(,\d{3})*$") == {"pattern": r"^\d{1,3}(,\d{3})*$"}
    assert parse_args("a=1, b=2.5 ,c=true, d=None, e='x, y=z', f=\"7\", g= spaced text ") == {
        "a": 1,
        "b": 2.5,
        "c": True,
        "d": None,
        "e": "x, y=z",
        "f": "7",
        "g": "spaced text",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_args("justavalue")
    with pytest.raises(ValueError, match="twice"):
        parse_args("a=1, a=2")


# ----------------------------------------------------------------------------- load_reward


def test_builtins_by_name():
    assert {"exact_match", "contains_answer", "format", "length"} <= set(available_rewards())
    assert isinstance(load_reward("exact_match"), ExactMatch)
    assert isinstance(load_reward("exact-match"), ExactMatch)
    assert isinstance(load_reward("contains_answer"), ContainsAnswer)
    assert isinstance(load_reward("format"), FormatReward)
    assert isinstance(load_reward(" length "), LengthReward)


def test_builtins_with_args():
    fmt = load_reward(r"format(pattern=^\d+$)")
    assert fmt.pattern == r"^\d+$"
    assert fmt([PROMPT] * 2, ["42", "forty-two"]) == [1.0, 0.0]
    length = load_reward("length(max_length=3, unit=chars)")
    assert (length.max_length, length.unit) == (3, "chars")
    assert load_reward("contains_answer(answer_column=label)").answer_column == "label"
    renamed = load_reward("format(pattern=[a-z]+, name=lowercase_word)")
    assert renamed.name == "lowercase_word" and isinstance(renamed, FormatReward)
    with pytest.raises(ValueError, match="Signature: format"):
        load_reward("format(patern=x)")


def test_module_callable_forms(helpers):
    fn = load_reward(f"{helpers}:brevity")
    assert isinstance(fn, FunctionReward) and fn.name == "brevity"
    assert fn([PROMPT] * 2, ["red", "it is red"]) == [1.0, 1 / 3]
    cls = load_reward(f"{helpers}:Constant")
    assert cls.name == "constant" and cls([PROMPT], ["x"]) == [1.0]
    factory = load_reward(f"{helpers}:make_constant(value=0.25)")
    assert factory([PROMPT], ["x"]) == [0.25]
    assert load_reward(f"{helpers}:Constant(value=-1, name=minus_one)").name == "minus_one"
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        load_reward(f"{helpers}:missing")
    with pytest.raises(ValueError, match="not callable"):
        load_reward(f"{helpers}:not_callable")


def test_weighted_specs(helpers):
    scaled = load_reward("exact_match:2")
    assert isinstance(scaled, ScaledReward) and scaled.name == "exact_match"
    assert scaled([PROMPT] * 3, ["red", "blue", "x"], answer=["red", "red", None]) == [2.0, 0.0, None]

    combined = load_rewards(["exact_match:0.5", "length(max_length=1):0.25", f"{helpers}:brevity"])
    assert combined.names == ["exact_match", "length", "brevity"]
    assert combined.weights == {"exact_match": 0.5, "length": 0.25, "brevity": 1.0}
    completions = ["Red.", "it is red"]
    columns, total = combined.score([PROMPT] * 2, completions, answer=["red", "red"])
    assert columns == {"exact_match": [1.0, 0.0], "length": [1.0, 0.0], "brevity": [1.0, 1 / 3]}
    assert total == pytest.approx([0.5 + 0.25 + 1.0, 0.0 + 0.0 + 1 / 3])
    assert combined([PROMPT] * 2, completions, answer=["red", "red"]) == pytest.approx(total)
    assert combined.combined([PROMPT] * 2, completions, answer=["red", "red"]) == pytest.approx(total)
    assert combined.score_all([PROMPT] * 2, completions, answer=["red", "red"]) == columns


def test_url_specs():
    from reward_models.server import running_server

    with running_server("length") as server:
        remote = load_reward(server.url)
        assert isinstance(remote, RemoteReward) and remote.url == server.url and remote.name == "length"
        combined = load_rewards([f"{server.url}:0.5", "exact_match"])
    assert isinstance(combined.rewards[0], RemoteReward)
    assert combined.rewards[0].url == server.url
    assert combined.weights == {"length": 0.5, "exact_match": 1.0}
    with pytest.raises(ValueError, match="port"):
        load_reward("http://127.0.0.1:99999999")


def test_reward_model_directory_imports_lazily(tmp_path, monkeypatch):
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    (rm_dir / "reward_config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    loaded = []

    class FakeVLMRewardModel(Reward):
        name = "vlm_reward"

        @classmethod
        def from_pretrained(cls, path):
            loaded.append(path)
            return cls()

        def __call__(self, prompts, completions, **kwargs):
            return [0.5] * len(completions)

    fake = types.ModuleType("reward_models.vlm_reward")
    fake.VLMRewardModel = FakeVLMRewardModel
    monkeypatch.setitem(sys.modules, "reward_models.vlm_reward", fake)
    reward = load_reward(str(rm_dir))
    assert isinstance(reward, FakeVLMRewardModel) and loaded == [str(rm_dir)]
    combined = load_rewards([f"{rm_dir}:2"])
    assert combined.weights == {"vlm_reward": 2.0} and loaded == [str(rm_dir)] * 2


def test_reward_model_directory_without_module(tmp_path, monkeypatch):
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    (rm_dir / "reward_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "reward_models.vlm_reward", None)  # makes the import fail
    with pytest.raises(ImportError, match="reward_config.json.*reward_models.vlm_reward"):
        load_reward(str(rm_dir))


def test_directory_without_marker_and_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="has no reward_config.json"):
        load_reward(str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'exact_match'") as info:
        load_reward("exact_mach")
    message = str(info.value)
    for form in ("exact_match", "contains_answer", "format", "length", "module.path:callable", "http://host:port"):
        assert form in message
    with pytest.raises(ValueError, match="no such directory"):
        load_reward(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="empty reward spec"):
        load_reward("  ")
    with pytest.raises(ValueError, match="unknown reward spec"):
        load_reward("format(pattern=x")


def test_callables_and_registry(isolated_registry):
    def my_score(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    assert load_reward(my_score).name == "my_score"
    assert as_reward(lambda p, c, **k: [0.0] * len(c)).name == "lambda"
    assert as_reward(my_score, name="other").name == "other"
    exact = ExactMatch()
    assert as_reward(exact) is exact

    @register_reward("shouty")
    class Shouty(Reward):
        name = "shouty"

        def __init__(self, bonus: float = 0.0):
            self.bonus = bonus

        def __call__(self, prompts, completions, **kwargs):
            return [float(c.isupper()) + self.bonus for c in completions]

    assert "shouty" in available_rewards()
    assert load_reward("shouty(bonus=0.5)")([PROMPT] * 2, ["RED", "red"]) == [1.5, 0.5]
    register_reward("shouty")(Shouty)  # same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact_match")(Shouty)
    with pytest.raises(ValueError, match="identifiers"):
        register_reward("not a name")


# ----------------------------------------------------------------------------- validation


def test_validate_scores():
    assert validate_scores("r", [1, True, None, 0.5], 4) == [1.0, 1.0, None, 0.5]
    assert validate_scores("r", np.array([0.5, 1.0]), 2) == [0.5, 1.0]
    assert validate_scores("r", torch.tensor([0.25]), 1) == [0.25]
    assert validate_scores("r", [np.float32(0.5), torch.tensor(2.0)], 2) == [0.5, 2.0]
    with pytest.raises(RewardOutputError, match="reward 'r' returned 1 scores for 2 completions"):
        validate_scores("r", [1.0], 2)
    with pytest.raises(RewardOutputError, match="reward 'r' must return a list"):
        validate_scores("r", 1.0, 1)
    with pytest.raises(RewardOutputError, match="str for sample 0"):
        validate_scores("r", ["1.0"], 1)
    with pytest.raises(RewardOutputError, match="nan for sample 1"):
        validate_scores("r", [1.0, math.nan], 2)


def test_combined_reward_validates_and_handles_none():
    def short(prompts, completions, **kwargs):
        return [1.0]

    combined = CombinedReward([ExactMatch(), short])
    with pytest.raises(RewardOutputError, match="reward 'short' returned 1 scores for 2 completions"):
        combined([PROMPT] * 2, ["a", "b"], answer=["a", "b"])

    def maybe(prompts, completions, **kwargs):
        return [None, 3.0, None]

    combined = CombinedReward([ExactMatch(), maybe], weights=[2.0, -1.0])
    columns, total = combined.score([PROMPT] * 3, ["red", "red", "red"], answer=["red", None, None])
    assert columns == {"exact_match": [1.0, None, None], "maybe": [None, 3.0, None]}
    assert total == [2.0, -3.0, None]

    dup = CombinedReward([ExactMatch(), ExactMatch(answer_column="alt"), ExactMatch()])
    assert dup.names == ["exact_match", "exact_match_2", "exact_match_3"]
    with pytest.raises(ValueError, match="at least one"):
        CombinedReward([])
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        CombinedReward([ExactMatch()], weights=[1.0, 2.0])


def test_reward_errors_name_the_reward():
    def broken(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as info:
        load_rewards([broken])([PROMPT], ["x"])
    assert any("broken" in note for note in getattr(info.value, "__notes__", ["broken"]))


def test_completion_text():
    assert completion_text("red") == "red"
    assert completion_text([{"role": "assistant", "content": "red"}]) == "red"
    assert completion_text({"role": "assistant", "content": [{"type": "text", "text": "re"}, {"type": "text", "text": "d"}]}) == "red"
    both = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}, {"role": "assistant", "content": "a2"}]
    assert completion_text(both) == "a1\na2"
    assert completion_text([{"content": [{"type": "image"}, {"type": "text", "text": "x"}]}]) == "x"
    with pytest.raises(TypeError):
        completion_text(3)
