"""Rewards for tests/evaluation/test_compare.py, importable as `compare_helpers:NAME`."""

from __future__ import annotations

calls: list[dict] = []


def record_kwargs(prompts, completions, **kwargs):
    """Appends the keyword arguments of each call to `calls` and scores every completion 0.0."""
    calls.append(kwargs)
    return [0.0] * len(completions)
