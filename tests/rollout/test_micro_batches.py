"""Micro-batch planning (vlm_rl/rollout/micro_batches.py): pure functions of the rows' token counts, checked against
plans worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from vlm_rl.rollout.micro_batches import RowLengths, by_count, by_tokens, micro_batch_tokens


def test_a_micro_batch_costs_its_padded_prompts_and_responses():
    lengths = RowLengths(prompt=[10, 12, 12], response=[3, 5, 1])
    assert micro_batch_tokens([0, 1], lengths) == 2 * 12 + 2 * 5  # each row's prompt, padded to the longest
    assert micro_batch_tokens([2], lengths) == 12 + 1
    assert micro_batch_tokens([], lengths) == 0
    shared = RowLengths(prompt=[12, 12, 12], response=[3, 5, 1], prompt_ids=[0, 0, 0])
    assert micro_batch_tokens([0, 1, 2], shared) == 12 + 3 * 5  # one pass over the shared prompt


def test_rows_fill_micro_batches_longest_first_up_to_the_budget():
    lengths = RowLengths(prompt=[10] * 6, response=[1, 50, 3, 20, 2, 40])
    # by length (prompt + response): rows 1 (60), 5 (50), 3 (30), 2 (13), 4 (12), 0 (11)
    # [1, 5]: 2 x 10 + 2 x 50 = 120; + row 3 would be 3 x 60 = 180 > 120; [3, 2, 4, 0]: 4 x 10 + 4 x 20 = 120
    assert by_tokens(range(6), lengths, max_tokens=120) == [[1, 5], [3, 2, 4, 0]]
    # [1, 5] is 120 > 119: [1]; [5, 3]: 2 x 10 + 2 x 40 = 100, + row 2: 150; [2, 4, 0]: 3 x 10 + 3 x 3 = 39
    assert by_tokens(range(6), lengths, max_tokens=119) == [[1], [5, 3], [2, 4, 0]]
    assert by_tokens(range(6), lengths, max_tokens=10) == [[1], [5], [3], [2], [4], [0]]  # a row over the budget: alone
    assert by_tokens([4, 0], lengths, max_tokens=1000) == [[4, 0]]
    assert by_tokens([], lengths, max_tokens=1000) == []


def test_a_shared_prompt_keeps_its_rows_together_and_counts_once():
    lengths = RowLengths(prompt=[100, 100, 20, 100, 20, 20], response=[5, 9, 30, 1, 2, 4], prompt_ids=[0, 0, 1, 0, 1, 1])
    # prompt 0 (longest row 109) first, its rows by response length: 1, 0, 3 -> 100 + 3 x 9 = 127
    # then prompt 1 (longest 50): rows 2, 5, 4; with prompt 0's rows: 2 x 100 + 6 x 30 = 380 > 200 -> on its own: 20 + 3 x 30
    assert by_tokens(range(6), lengths, max_tokens=200) == [[1, 0, 3], [2, 5, 4]]
    assert by_tokens(range(6), lengths, max_tokens=400) == [[1, 0, 3, 2, 5, 4]]  # 2 x 100 + 6 x 30 = 380
    # [1, 0]: 100 + 2 x 9 = 118, + row 3: 127; row 3 alone, as + row 2 (another prompt) would be 2 x 100 + 2 x 30
    assert by_tokens(range(6), lengths, max_tokens=118) == [[1, 0], [3], [2, 5, 4]]


def test_every_rank_can_be_given_as_many_micro_batches_as_the_busiest():
    lengths = RowLengths(prompt=[10] * 6, response=[1, 50, 3, 20, 2, 40])
    # [[1, 5], [3, 2, 4, 0]], both 120 tokens: the first of the largest is halved, then the next largest
    assert by_tokens(range(6), lengths, max_tokens=120, at_least=3) == [[1], [5], [3, 2, 4, 0]]
    assert by_tokens(range(6), lengths, max_tokens=120, at_least=4) == [[1], [5], [3, 2], [4, 0]]
    assert by_tokens(range(6), lengths, max_tokens=120, at_least=6) == [[1], [5], [3], [2], [4], [0]]
    with pytest.raises(ValueError, match="at least 7"):
        by_tokens(range(6), lengths, max_tokens=120, at_least=7)


def test_fixed_size_micro_batches_keep_a_prompts_rows_next_to_each_other():
    lengths = RowLengths(prompt=[10] * 8, response=[1] * 8, prompt_ids=[0, 1, 0, 1, 2, 2, 0, 1])
    assert by_count([0, 1, 2, 3, 4, 5, 6, 7], 3, lengths) == [[0, 2, 6], [1, 3, 7], [4, 5]]
    assert by_count([5, 1, 6, 2], 2, lengths) == [[5, 1], [6, 2]]  # 6 and 2 share prompt 0: next to each other
    alone = RowLengths(prompt=[10] * 4, response=[1] * 4)
    assert by_count([3, 1, 0, 2], 2, alone) == [[3, 1], [0, 2]]  # no shared prompt: the given order
    assert by_count([3, 1], 1, alone) == [[3], [1]]  # one row at a time (per_device_train_batch_size 1) is a size
    with pytest.raises(ValueError, match="must be >= 1"):
        by_count([3, 1], 0, alone)


def test_a_long_tail_of_lengths_computes_far_less_padding_under_a_budget():
    rng = random.Random(0)
    n = 64
    response = [round(math.exp(rng.uniform(math.log(8), math.log(512)))) for _ in range(n)]  # log-uniform, 8-512
    lengths = RowLengths(prompt=[rng.randint(330, 380) for _ in range(n)], response=response)
    fixed = by_count(list(range(n)), 8, lengths)
    budget = 8 * (380 + 512)  # what a fixed micro-batch of 8 may take at worst
    planned = by_tokens(range(n), lengths, budget)
    assert sorted(r for mb in planned for r in mb) == list(range(n))  # every row once
    assert all(micro_batch_tokens(mb, lengths) <= budget for mb in planned)
    real = sum(lengths.prompt) + sum(response)
    padded_fixed = sum(micro_batch_tokens(mb, lengths) for mb in fixed)
    padded_planned = sum(micro_batch_tokens(mb, lengths) for mb in planned)
    # measured: 32,089 real tokens; 47,728 computed in fixed micro-batches of 8, 36,034 in 6 planned ones
    assert padded_planned < 1.15 * real and padded_fixed > 1.3 * padded_planned
    assert len(planned) < len(fixed)
