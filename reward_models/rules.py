r"""Verifiable (rule-based) rewards: VQA answer matching, output format, output length.

All of them follow the reward signature of :mod:`reward_models.base`
(``reward(prompts, completions, **kwargs) -> list[float | None]``), ignore ``prompts`` and
``images``, and read completions through :func:`reward_models.base.completion_text` (plain
strings and TRL conversational completions both work). They are registered under the names
``exact_match``, ``contains_answer``, ``format`` and ``length`` for ``load_reward``.

Answer normalisation (:func:`normalize_answer`), applied in this order:

1. Unicode NFKC, then lowercase.
2. Thousands separators go: a comma between a digit and three digits (``1,000`` -> ``1000``).
3. Apostrophes (``'`` and ``’``) are deleted (``don't`` -> ``dont``).
4. Every other punctuation character (anything that is not a letter, digit or whitespace, and
   ``_``) becomes a space, except a ``.`` between two digits (``2.5`` stays ``2.5``).
5. Split on whitespace; drop the articles ``a``, ``an``, ``the``; map the number words ``zero`` ...
   ``twenty`` to digits (``two`` -> ``2``); join with single spaces.

So ``"The Red."`` -> ``"red"``, ``"Two"`` -> ``"2"``, ``"a circle"`` -> ``"circle"``.
No stemming: ``"squares"`` does not match ``"square"``.

References: the answer rewards read the sample's reference from a dataset column (``answer`` by
default, ``answer_column=`` to change it). An entry may be a string, a number (compared as its
``str``), or a list/tuple of acceptable answers (None entries ignored). A sample whose entry is
None (or an empty list) scores None. A batch without the column at all raises ValueError naming it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from reward_models.base import Reward, completion_texts, register_reward

__all__ = ["ContainsAnswer", "ExactMatch", "FormatReward", "LengthReward", "normalize_answer"]

_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PUNCT_RE = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")


def normalize_answer(text: Any) -> str:
    """Normalise a short answer for comparison (exact steps in the module docstring)."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _THOUSANDS_RE.sub("", text)
    text = text.replace("'", "").replace("\u2019", "")
    text = _PUNCT_RE.sub(" ", text)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES)


def _references(kwargs: dict, column: str, n: int, reward_name: str) -> list[list[str] | None]:
    """Per sample: the list of acceptable reference answers, or None when there is none."""
    if column not in kwargs:
        raise ValueError(
            f"reward {reward_name!r} needs the dataset column {column!r} (the reference answer of each sample), "
            f"but the batch only has the columns {sorted(kwargs)}; add it to the dataset or pass "
            f"answer_column=<column> (e.g. '{reward_name}(answer_column=label)')"
        )
    values = kwargs[column]
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"reward {reward_name!r}: column {column!r} must be a list with one entry per sample, "
            f"got {type(values).__name__}"
        )
    if len(values) != n:
        raise ValueError(f"reward {reward_name!r}: column {column!r} has {len(values)} entries for {n} completions")
    refs: list[list[str] | None] = []
    for v in values:
        if v is None:
            refs.append(None)
        elif isinstance(v, (list, tuple)):
            refs.append([str(x) for x in v if x is not None] or None)
        else:
            refs.append([str(v)])
    return refs


class ReferenceMatch(Reward):
    """1.0 when the completion `matches` one of the sample's acceptable references, 0.0 when none does,
    None when the sample has no reference. The references are the `answer_column` (a string or a list)."""

    name = "reference_match"

    def __init__(self, answer_column: str = "answer"):
        self.answer_column = answer_column

    @property
    def required_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.answer_column,)

    @property
    def column_options(self) -> dict[str, str]:  # type: ignore[override]
        return {self.answer_column: "answer_column"}

    def matches(self, text: str, reference: str) -> bool:
        raise NotImplementedError

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        refs = _references(kwargs, self.answer_column, len(completions), self.name)
        return [
            None if ref is None else 1.0 if any(self.matches(text, r) for r in ref) else 0.0
            for text, ref in zip(completion_texts(completions), refs)
        ]


@register_reward("exact_match")
class ExactMatch(ReferenceMatch):
    """1.0 when the normalised completion equals the normalised reference, else 0.0.

    Exact semantics: ``score = 1.0 if normalize_answer(completion) == normalize_answer(ref)`` for
    at least one acceptable reference ``ref`` of the sample (read from ``answer_column``), else
    ``0.0``; None when the sample has no reference. ``"The Red."`` matches ``"red"``; ``"It is red"``
    does not (use ``contains_answer`` for that).
    """

    name = "exact_match"

    def matches(self, text: str, reference: str) -> bool:
        return normalize_answer(text) == normalize_answer(reference)


@register_reward("contains_answer")
class ContainsAnswer(ReferenceMatch):
    """1.0 when the normalised reference occurs as whole words in the normalised completion, else 0.0.

    Exact semantics: both texts are normalised (:func:`normalize_answer`) and split into words;
    ``score = 1.0`` if, for at least one acceptable reference, its words occur as a contiguous run
    of the completion's words, else ``0.0``; None when the sample has no reference. A reference that
    normalises to nothing (e.g. ``"the"``) matches only a completion that also normalises to nothing.
    ``"There are two squares."`` contains ``"2"``; ``"reddish"`` does not contain ``"red"``.

    Caveat: a policy can game this reward by listing every candidate answer ("red green blue").
    Combine it with ``length`` or ``format``, or prefer ``exact_match``, when that matters.
    """

    name = "contains_answer"

    def matches(self, text: str, reference: str) -> bool:
        words, ref = normalize_answer(text).split(), normalize_answer(reference).split()
        if not ref:
            return not words
        k = len(ref)
        return any(words[i : i + k] == ref for i in range(len(words) - k + 1))


@register_reward("format")
class FormatReward(Reward):
    r"""1.0 when the stripped completion fully matches a regular expression, else 0.0.

    Exact semantics: ``score = 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0``, with
    Python ``re`` syntax and no flags (use inline flags such as ``(?i)`` or ``(?s)``). The default
    pattern ``\w+\.?`` accepts a single word optionally followed by a full stop ("red", "Red.");
    ``^``/``$`` anchors are allowed but redundant. Never None.
    """

    name = "format"
    DEFAULT_PATTERN = r"\w+\.?"

    def __init__(self, pattern: str = DEFAULT_PATTERN):
        self.pattern = str(pattern)
        try:
            self.regex = re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"reward 'format': invalid regular expression {self.pattern!r}: {e}") from e

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        return [1.0 if self.regex.fullmatch(t.strip()) else 0.0 for t in completion_texts(completions)]


@register_reward("length")
class LengthReward(Reward):
    """1.0 for a completion whose length lies in ``[min_length, max_length]``, decreasing linearly outside.

    Exact semantics, with ``n`` the length of the completion in ``unit``:

    * ``unit="words"``: ``n = len(completion.split())`` (whitespace-separated words);
      ``unit="chars"``: ``n = len(completion.strip())`` (characters).
    * ``n < min_length``: ``score = n / min_length`` (0.0 for an empty completion).
    * ``min_length <= n <= max_length``: ``score = 1.0``.
    * ``n > max_length``: ``score = max(0.0, 1 - (n - max_length) / tolerance)``; ``tolerance``
      defaults to ``max(max_length, 1)``, so the score reaches 0.0 at twice ``max_length``.
    * ``max_length=None`` (the default) means no upper bound; with the default ``min_length=1`` the
      reward is then 1.0 for any non-empty completion and 0.0 for an empty one.

    Never None. Example: ``length(max_length=3)`` gives 1.0 to "red", 1.0 to "it is red",
    2/3 to "it is bright red" (one word over, tolerance 3) and 0.0 from six words on.
    """

    name = "length"
    UNITS = ("words", "chars")

    def __init__(
        self,
        min_length: int = 1,
        max_length: int | None = None,
        tolerance: float | None = None,
        unit: str = "words",
    ):
        if unit in ("characters", "char"):
            unit = "chars"
        if unit not in self.UNITS:
            raise ValueError(f"reward 'length': unit must be one of {self.UNITS}, got {unit!r}")
        if min_length < 0:
            raise ValueError(f"reward 'length': min_length must be >= 0, got {min_length}")
        if max_length is not None and max_length < min_length:
            raise ValueError(f"reward 'length': max_length ({max_length}) < min_length ({min_length})")
        if tolerance is not None and tolerance <= 0:
            raise ValueError(f"reward 'length': tolerance must be > 0, got {tolerance}")
        self.min_length = min_length
        self.max_length = max_length
        self.tolerance = float(tolerance) if tolerance is not None else float(max(max_length or 1, 1))
        self.unit = unit

    def length(self, text: str) -> int:
        """The completion's length in ``unit``."""
        return len(text.split()) if self.unit == "words" else len(text.strip())

    def score_length(self, n: int) -> float:
        """The score of a completion of length ``n``."""
        if n < self.min_length:
            return n / self.min_length
        if self.max_length is not None and n > self.max_length:
            return max(0.0, 1.0 - (n - self.max_length) / self.tolerance)
        return 1.0

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        return [self.score_length(self.length(t)) for t in completion_texts(completions)]
