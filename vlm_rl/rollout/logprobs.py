"""One forward over query|response -> per-token logprobs and entropy of the response tokens.

Only the hidden states that predict response tokens go through the LM head: a VLM prompt holds hundreds
of image tokens, and their logits over a 151k vocabulary are never materialised. Logits are divided by
the sampling temperature and taken in fp32 (also under bf16 autocast), so that they are the distribution the rollout sampled from.
The forward computes no column that is padding in every row of its batch (`Rollout.trimmed`), and runs a prompt that
several rows share once (vlm_rl/rollout/prefix.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from vlm_rl.models.dummy_image import tower_on_every_rank
from vlm_rl.models.families import causal_lm_parts
from vlm_rl.rollout.batch import Rollout
from vlm_rl.rollout.integrity import check_model_inputs
from vlm_rl.rollout.prefix import caches_in_forward, groups, shared_prompt_hidden_states


def response_hidden_states(model: nn.Module, rollout: Rollout, where: str) -> torch.Tensor:
    """Last hidden states at the positions that predict response tokens. (B, T_r, H)

    M-RoPE positions are recomputed from this batch's own attention_mask, mm_token_type_ids, image_grid_thw and
    video_grid_thw (+ Qwen2.5-VL's second_per_grid_ts) (no past_key_values), so a `rope_deltas` cached by an earlier
    `generate` never leaks in. The images and videos go in as the rollout's encoded features where `model` may use
    them exactly, else as pixels. Rows that share a prompt (`Rollout.prompt_ids`) share one pass over it (its images
    and videos included) where the forward can keep a KV cache.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base if not hasattr(base, "lm_head") else causal_lm_parts(model)[0]  # a separate critic is a backbone
    if hasattr(backbone, "rope_deltas"):
        backbone.rope_deltas = None
    features = rollout.image_features
    reads_features = features is not None and features.usable_by(model)  # the same on every rank (vision_features)
    has_images, has_videos = bool(sum(rollout.num_images)), bool(sum(rollout.num_videos()))
    with tower_on_every_rank(model, has_images=has_images, reads_features=reads_features, has_videos=has_videos):
        if rollout.prompt_ids is not None and caches_in_forward(backbone):
            first, rows = groups(rollout.prompt_ids)
            prompts = rollout.select(first)
            inputs = prompts.model_inputs(model, prompts_only=True)
            check_model_inputs(model, inputs, prompts.num_images, prompts.sources, where, prompts.num_videos())
            return shared_prompt_hidden_states(backbone, inputs, rollout.responses, rollout.attention_mask, rows)
        inputs = rollout.model_inputs(model)
        check_model_inputs(model, inputs, rollout.num_images, rollout.sources, where, rollout.num_videos())
        hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T_q + T_r, H)
    c = rollout.context_length
    return hidden[:, c - 1 : -1]  # (B, T_r, H): position t predicts token t + 1


def padded_responses(values: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token values `(B, T)` of a trimmed rollout, zero-padded on the right to `width` response columns."""
    return F.pad(values, (0, width - values.shape[1]))


def response_logprobs(
    model: nn.Module,
    rollout: Rollout,
    temperature: float,
    hidden: torch.Tensor | None = None,
    where: str = "forward",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs `(B, T_r)` and entropy `(B, T_r)` of the response tokens; 0 where masked.

    `hidden`: the rollout's `response_hidden_states`, already computed; without it the forward runs over the rollout's
    columns that are not padding in every row."""
    if hidden is None:
        trimmed = rollout.trimmed()
        hidden = response_hidden_states(model, trimmed, where)
        logprobs, entropy = response_logprobs(model, trimmed, temperature, hidden=hidden)
        width = rollout.response_mask.shape[1]
        return padded_responses(logprobs, width), padded_responses(entropy, width)
    _, lm_head = causal_lm_parts(model)
    logits = lm_head(hidden)  # (B, T_r, V), in the compute dtype (bf16 under autocast)
    with torch.autocast(device_type=logits.device.type, enabled=False):  # the log-softmax in fp32
        logits = logits.float() / temperature
        logprobs = selective_log_softmax(logits, rollout.responses)  # (B, T_r)
        entropy = entropy_from_logits(logits)  # (B, T_r)
    mask = rollout.response_mask
    return logprobs.masked_fill(~mask, 0.0), entropy.masked_fill(~mask, 0.0)
