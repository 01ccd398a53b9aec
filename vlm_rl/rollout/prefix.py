"""A group costs one prompt: each distinct prompt of a batch runs through the language model once, and its KV cache
is repeated for every row (sample) of that prompt.

With `num_generations: G` a prompt, hundreds of image tokens long, has G rows. `generate` and every forward over
query|response would otherwise run the same prompt G times, although causal attention makes the prompt's keys,
values and hidden states the same in every copy. Here the prompt runs once (its images, positions and DeepStack
features included), the cache (`DynamicCache.reorder_cache`: an `index_select` along the batch, so gradients flow
back to the one prompt pass) is repeated to the rows, and the rows go on from it: `generate` decodes from it, a
forward runs the responses on top of it. Positions cannot be computed by a forward that continues from a cache
(M-RoPE's come from the images of the prompt), so both passes get them explicitly (`Family.positions`): a response
token's position is the prompt's last position plus its offset, as in `generate`.

The numbers are those of the full pass up to float rounding (other shapes, another order of the same sums); the
forward falls back to the full pass where a cache cannot be used (activation checkpointing while training drops it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlm_rl.models.families import family_of

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # the inputs that have a column per token


def groups(prompt_ids: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """(the first row of each distinct prompt, in order of appearance; each row's index into those firsts `(B,)`)."""
    first: dict[int, int] = {}
    for row, prompt in enumerate(prompt_ids):
        first.setdefault(prompt, row)
    order = {prompt: k for k, prompt in enumerate(first)}
    return list(first.values()), torch.tensor([order[p] for p in prompt_ids], dtype=torch.long)


def repeats(prompt_ids: Sequence[int] | None) -> bool:
    """Whether some prompt has several rows."""
    return prompt_ids is not None and len(set(prompt_ids)) < len(prompt_ids)


def caches_in_forward(backbone: nn.Module) -> bool:
    """False where a forward would drop a KV cache: activation checkpointing in a training forward that wants
    gradients (transformers then runs the layers without one)."""
    if not torch.is_grad_enabled():
        return True
    return not any(getattr(m, "gradient_checkpointing", False) and m.training for m in backbone.modules())


def _take_rows(positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Positions `(3, U, T)` or `(U, T)` of the prompts -> those of `rows` `(3, B, T)` or `(B, T)`."""
    return positions.index_select(-2, rows.to(positions.device))


def _next_positions(positions: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The positions of `n` text tokens after each row's prompt: its last position + 1, + 2, ..."""
    last = _take_rows(positions, rows)[..., -1:]
    return last + torch.arange(1, n + 1, device=positions.device)


def _run_prompts(backbone: nn.Module, inputs: dict, end: int | None = None) -> tuple[object, torch.Tensor]:
    """The backbone over the prompts of `inputs` (up to column `end`) with a fresh KV cache: (its output, the
    positions of every prompt token)."""
    positions = family_of(backbone).positions(backbone, inputs)
    cut = {k: inputs[k][:, :end] for k in TOKEN_KEYS if inputs.get(k) is not None}
    rest = {k: v for k, v in inputs.items() if k not in TOKEN_KEYS and k != "position_ids"}
    out = backbone(**cut, **rest, position_ids=positions[..., :end], use_cache=True)
    return out, positions


def prefilled_generate_inputs(backbone: nn.Module, inputs: dict, rows: torch.Tensor) -> dict:
    """`generate`'s keyword arguments for `rows` (`(B,)`, each an index into the prompts of `inputs`): every prompt but
    its last token already in a KV cache, computed once per prompt (with its images) and repeated for its rows;
    `generate` runs the last token of every row and decodes from there."""
    out, positions = _run_prompts(backbone, inputs, end=-1)
    cache = out.cache
    cache.reorder_cache(rows.to(inputs["input_ids"].device))
    index = rows.to(inputs["input_ids"].device)
    return {
        "input_ids": inputs["input_ids"][index],
        "attention_mask": inputs["attention_mask"][index],
        "position_ids": _take_rows(positions, rows),
        "cache": cache,
    }


def shared_prompt_hidden_states(
    backbone: nn.Module, prompt_inputs: dict, responses: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Last hidden states at the positions that predict each row's response tokens `(B, T_r, H)`, as a full forward
    over query|response gives them: each distinct prompt of `prompt_inputs` `(U, T_q)` run once, its cache repeated
    to `rows` `(B,)`, then the rows' `responses` `(B, T_r)` on top (`attention_mask` `(B, T_q + T_r)`)."""
    out, positions = _run_prompts(backbone, prompt_inputs)
    index = rows.to(responses.device)
    last = out.last_hidden_state[:, -1:][index]  # (B, 1, H): the prompt's last token predicts the first response token
    t = responses.shape[1] - 1
    if t == 0:
        return last
    cache = out.cache
    cache.reorder_cache(index)
    on_top = backbone(
        input_ids=responses[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=_next_positions(positions, rows, t),
        cache=cache,
        use_cache=True,
    ).last_hidden_state  # (B, T_r - 1, H)
    return torch.cat([last, on_top], dim=1)
