"""Rewards for tests/evaluation/test_score.py, importable as `score_helpers:NAME` (in-process and in `vlm-rl score` subprocesses)."""

from __future__ import annotations

import os
import signal

_calls = 0


def response_length(prompts, completions, **kwargs):
    """The number of characters of the response: known values for the summary test."""
    return [float(len(c)) for c in completions]


def counting(prompts, completions, **kwargs):
    """Logs the `_source` of every row it scores to $SCORE_TEST_CALL_LOG (one line each, fsynced) and returns 1.0.

    With $SCORE_TEST_KILL_AT_CALL=K, the K-th call of this process SIGKILLs the process after logging (a crash
    in the middle of a batch: its rows were scored but never written); with $SCORE_TEST_SIGINT_AT_CALL=K it sends
    itself SIGINT instead (Ctrl-C in the middle of a batch).
    """
    global _calls
    _calls += 1
    with open(os.environ["SCORE_TEST_CALL_LOG"], "a", encoding="utf-8") as f:
        for source in kwargs["_source"]:
            f.write(f"{source}\n")
        f.flush()
        os.fsync(f.fileno())
    if _calls == int(os.environ.get("SCORE_TEST_KILL_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if _calls == int(os.environ.get("SCORE_TEST_SIGINT_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGINT)
    return [1.0] * len(completions)


def fails_on_marker(prompts, completions, **kwargs):
    """Raises for any batch holding the response 'FAIL': the scorer must isolate that row and score the others."""
    if "FAIL" in completions:
        raise RuntimeError("cannot score 'FAIL'")
    return [0.5] * len(completions)


def never_scores(prompts, completions, **kwargs):
    """None for every row: a reward that cannot score this data at all."""
    return [None] * len(completions)
