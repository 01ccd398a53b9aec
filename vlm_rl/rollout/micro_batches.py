"""A rollout's rows into micro-batches: a fixed number of rows each, or as many as fit a token budget
(`max_tokens_per_micro_batch`, as verl's dynamic batch size and OpenRLHF's packing budget).

A forward over a micro-batch computes each distinct prompt once when its rows share it (vlm_rl/rollout/prefix.py),
else every row's prompt, all padded to the longest prompt of the micro-batch, plus every row's response padded to
the longest response (`micro_batch_tokens`; padding outside that is never computed, `Rollout.trimmed`). Rows sorted
by length fill micro-batches up to the budget, so a micro-batch holds rows of similar lengths and little padding;
rows of one prompt stay next to each other. The split changes no gradient: the loss is a token mean over the whole
mini-batch whatever its micro-batches (vlm_rl/training/trainer.py).

Pure functions of the rows' token counts (no model, no tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowLengths:
    """What a micro-batch's cost depends on, per row of a rollout."""

    prompt: Sequence[int]  # tokens of each row's prompt, image tokens included
    response: Sequence[int]  # tokens of each row's response
    prompt_ids: Sequence[int] | None = None  # rows with the same id share one pass over their prompt; None: none do

    def prompt_of(self, row: int) -> int | tuple[str, int]:
        """The key under which rows share their prompt (each row its own when none share)."""
        return ("row", row) if self.prompt_ids is None else self.prompt_ids[row]


def micro_batch_tokens(rows: Sequence[int], lengths: RowLengths) -> int:
    """Tokens, padding included, that one forward over `rows` computes: each distinct prompt (each row's when they
    share none) padded to the longest prompt, and each response padded to the longest response."""
    if not rows:
        return 0
    prompts = len({lengths.prompt_of(r) for r in rows})
    return prompts * max(lengths.prompt[r] for r in rows) + len(rows) * max(lengths.response[r] for r in rows)


def by_count(rows: Sequence[int], size: int, lengths: RowLengths) -> list[list[int]]:
    """`rows` in micro-batches of `size` (the last may be smaller), in their order except that the rows of one prompt
    are moved next to its first row (so that they share its pass)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    position: dict = {}
    for k, r in enumerate(rows):
        position.setdefault(lengths.prompt_of(r), k)
    ordered = sorted(rows, key=lambda r: position[lengths.prompt_of(r)])  # stable: order kept within a prompt
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def by_tokens(rows: Sequence[int], lengths: RowLengths, max_tokens: int, at_least: int = 1) -> list[list[int]]:
    """`rows` in micro-batches of at most `max_tokens` tokens each (`micro_batch_tokens`; a row that alone exceeds
    the budget is a micro-batch of its own), and at least `at_least` of them (the largest split in two until there
    are: every rank runs as many micro-batches as the rank that needs most).

    Prompts (with their rows) in decreasing order of their longest row, the rows of a prompt in decreasing
    response length, fill one micro-batch after another."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not rows:
        return []
    if not 1 <= at_least <= len(rows):
        raise ValueError(f"cannot split {len(rows)} rows into at least {at_least} micro-batches")
    groups: dict = {}
    for r in rows:
        groups.setdefault(lengths.prompt_of(r), []).append(r)
    longest = {key: max(lengths.prompt[r] + lengths.response[r] for r in members) for key, members in groups.items()}
    ordered = [
        r
        for key in sorted(groups, key=lambda key: -longest[key])  # stable: ties keep the rows' order
        for r in sorted(groups[key], key=lambda r: -lengths.response[r])
    ]
    plan: list[list[int]] = []
    for r in ordered:
        if plan and micro_batch_tokens(plan[-1] + [r], lengths) <= max_tokens:
            plan[-1].append(r)
        else:
            plan.append([r])
    while len(plan) < at_least:
        largest = max((mb for mb in plan if len(mb) > 1), key=lambda mb: micro_batch_tokens(mb, lengths))
        k = plan.index(largest)
        half = len(largest) // 2
        plan[k : k + 1] = [largest[:half], largest[half:]]
    return plan
