"""The explicit rollout GenerationConfig and one batched, left-padded generate per rollout batch (each distinct prompt
prefilled once: vlm_rl/rollout/prefix.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedModel

from vlm_rl.models.dummy_image import tower_on_every_rank
from vlm_rl.models.families import ALL_VISION_TOKENS, causal_lm_parts
from vlm_rl.models.vision_features import PIXEL_KEYS, ImageFeatures, with_encoded_features
from vlm_rl.rollout.prefix import prefilled_generate_inputs

EOS_TOKENS = ["<|im_end|>", "<|endoftext|>"]
PAD_TOKEN = "<|endoftext|>"


def token_id(tokenizer, token: str) -> int:
    """The id of a special token, read from the tokenizer (never hard-coded)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"tokenizer has no token {token!r}: is this a Qwen2-VL tokenizer?")
    return int(tid)


def eos_token_ids(tokenizer) -> list[int]:
    return [token_id(tokenizer, t) for t in EOS_TOKENS]


def pad_token_id(tokenizer) -> int:
    return token_id(tokenizer, PAD_TOKEN)


def vision_token_ids(tokenizer) -> list[int]:
    """The ids of every family's vision tokens (vlm_rl.models.families) that the tokenizer has: never to be sampled.
    (LLaVA's tokenizer also holds the Qwen ones, the Qwen tokenizers have no `<image>`.)"""
    added = tokenizer.get_added_vocab()
    ids = [added[t] for t in ALL_VISION_TOKENS if t in added]
    if not ids:
        raise ValueError(f"tokenizer has none of the vision tokens {', '.join(ALL_VISION_TOKENS)}: is this a supported VLM's tokenizer?")
    return ids


def make_generation_config(
    tokenizer,
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
) -> GenerationConfig:
    """Every field that shapes sampling is set here, so nothing leaks in from a checkpoint's generation_config.json.

    Qwen2-VL-Instruct ships temperature 0.01, top_k 1, top_p 0.001 (near-greedy, no exploration); transformers
    fills any field left None from that file, hence the explicit neutral values below.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=eos_token_ids(tokenizer),
        pad_token_id=pad_token_id(tokenizer),
        bos_token_id=None,
        suppress_tokens=vision_token_ids(tokenizer),
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        use_cache=True,
        output_scores=False,
        return_dict_in_generate=False,
    )


@contextmanager
def generation_config_swapped(model: PreTrainedModel, config: GenerationConfig) -> Iterator[None]:
    """Make `config` the model's own generation config for the duration, so no checkpoint default can merge in."""
    original = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = original


def first_eos_mask(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions up to and including the first eos are the response; the rest is padding.

    Decided by position, never by `token != pad`: Qwen2-VL's pad token is also one of its eos tokens.
    Returns `(response_mask (B, T_r) bool, has_eos (B,) bool)`.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))  # (B, T_r)
    has_eos = is_eos.any(dim=1)  # (B,)
    t_r = response_ids.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, t_r, dtype=torch.long))  # (B,)
    positions = torch.arange(t_r, device=response_ids.device)  # (T_r,)
    response_mask = positions[None, :] <= first[:, None]  # (B, T_r), includes the eos itself
    return response_mask, has_eos


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG streams a computation on `device` draws from (for `torch.random.fork_rng`)."""
    return [device.index or 0] if device.type == "cuda" else []


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    image_features: ImageFeatures | None = None,
    seed: int | None = None,
    video_features: ImageFeatures | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One `generate` for the whole left-padded batch. Returns the new tokens `(B, T_r)`, T_r <= max_new_tokens.

    `synced_gpus`: every rank keeps stepping until all have finished (needed when the weights stay sharded).
    `image_features`, `video_features`: the batch's images and videos already encoded; used instead of the pixels
    where `model` may use them (for every kind the batch holds, or for none).
    `seed`: sample from a generator seeded with it, leaving the global RNG streams as they were; a synced rank
    that has finished keeps drawing until all have, so without it the draws after `generate` would depend on how
    long the other ranks decoded.
    `rows`: each output row's prompt `(B,)`, an index into the rows of `inputs` (one row per distinct prompt); each
    prompt is then prefilled once and its KV cache repeated for its rows (vlm_rl/rollout/prefix.py). Sampling draws
    the same random numbers either way: one step over all B rows at a time."""
    if "attention_mask" in inputs and inputs["attention_mask"][:, -1].eq(0).any():
        raise ValueError("prompts must be left-padded for batched generation (set processor.tokenizer.padding_side='left')")
    reads_features = image_features is not None and image_features.usable_by(model)  # the same on every rank
    has_images, has_videos = (inputs.get(PIXEL_KEYS[kind]) is not None for kind in ("image", "video"))
    inputs = with_encoded_features(model, inputs, {"image": image_features, "video": video_features})
    devices = rng_devices(inputs["input_ids"].device)
    with (
        generation_config_swapped(model, generation_config),
        torch.random.fork_rng(devices=devices, enabled=seed is not None),
        tower_on_every_rank(model, has_images, reads_features, has_videos),  # (a synced generate: every rank encodes, or none)
    ):
        if rows is not None:  # (the prefill is the first forward: where a rank without images runs its dummy)
            inputs = prefilled_generate_inputs(causal_lm_parts(model)[0], inputs, rows)
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**inputs, generation_config=generation_config, synced_gpus=synced_gpus)  # (B, T_q + T_r)
    return out[:, inputs["input_ids"].shape[1] :]
