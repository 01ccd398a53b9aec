"""Prompts into model inputs: chat template and processor, left-padded, never cut through their images or videos."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vlm_rl.data.errors import DataError
from vlm_rl.data.formats import PromptDataset
from vlm_rl.errors import ConfigError

logger = logging.getLogger(__name__)

COUNT_KEYS = ("num_images", "num_videos")  # what `encode_prompts` adds to the processor's tensors: no model input


class PromptTooLongError(ValueError):
    """A prompt (image tokens included) exceeds max_prompt_length; prompts are never cut through their images."""


def takes_video(processor) -> bool:
    """Whether the processor reads videos (the Qwen families' do; LLaVA's reads images only)."""
    return getattr(processor, "video_processor", None) is not None


def no_video_problem(processor) -> str:
    return (f"a video, but the model's processor ({type(processor).__name__}) takes no video (LLaVA-style models read "
            "images only). Use a Qwen-VL model for video data, or drop the row")


def model_inputs(query: dict) -> dict:
    """`encode_prompts`' output without its per-sample counts: the keyword arguments of `generate` and a forward."""
    return {k: v for k, v in query.items() if k not in COUNT_KEYS}


def video_kwargs(processor, samples: list[dict]) -> dict:
    """The processor's video arguments for the batch's videos (`vlm_rl.data.videos.Video`), already sampled and
    sized by qwen-vl-utils: no frame sampling again; each video's metadata (Qwen2.5-VL's time steps, Qwen3-VL's
    timestamps); qwen-vl-utils' per-frame pixel cap (transformers' `cap_pixels_per_frame`), which keeps the frames.
    A DataError naming the samples when the processor takes no video."""
    videos = [video for s in samples for video in s.get("videos") or ()]
    if not videos:
        return {}
    if not takes_video(processor):
        names = [s.get("_source", f"sample {i}") for i, s in enumerate(samples) if s.get("videos")]
        raise DataError(f"{', '.join(names)}: {no_video_problem(processor)}")
    return {
        "videos": [video.frames for video in videos],
        "video_metadata": [video.metadata() for video in videos],
        "videos_kwargs": {"do_sample_frames": False, "cap_pixels_per_frame": True},
    }


def encode_prompts(processor, samples: list[dict], max_prompt_length: int | None = None, tools: list[dict] | None = None) -> dict:
    """Chat-template and process a batch of normal-form samples, left-padded; `tools`: the JSON schemas of the tools
    the template shows (multi-turn rollouts).

    Returns the processor's tensors, ready for `generate` (`model_inputs`): `input_ids, attention_mask (B, T_q)`, and
    by family (vlm_rl.models.families) the Qwen families' `mm_token_type_ids (B, T_q)`, `pixel_values (N_patches, D)`
    and `image_grid_thw (N_images, 3)`, or LLaVA's `pixel_values (N_images, 3, H, W)`; plus `num_images` (list, per
    sample). When a sample has videos: `pixel_values_videos (N_video_patches, D)`, `video_grid_thw (N_videos, 3)`
    (Qwen2.5-VL: `second_per_grid_ts (N_videos,)`) and `num_videos` (list, per sample).
    """
    videos = video_kwargs(processor, samples)
    texts = [processor.apply_chat_template(s["prompt"], tools=tools, add_generation_prompt=True, tokenize=False) for s in samples]
    images = [image for s in samples for image in s["images"]]
    batch = processor(
        text=texts,
        images=images or None,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        **videos,
    )
    batch = dict(batch)
    batch["num_images"] = [len(s["images"]) for s in samples]
    if videos:
        batch["num_videos"] = [len(s.get("videos") or ()) for s in samples]
    if max_prompt_length is not None:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        too_long = [(s.get("_source", f"sample {i}"), n) for i, (s, n) in enumerate(zip(samples, lengths)) if n > max_prompt_length]
        if too_long:
            names = ", ".join(f"{src} ({n} tokens)" for src, n in too_long)
            raise PromptTooLongError(
                f"prompt longer than max_prompt_length={max_prompt_length}: {names}. Raise max_prompt_length, "
                "lower the processor's max_pixels, or set skip_long_prompts to drop such samples"
            )
    return batch


def same_prompt(a: dict, b: dict) -> bool:
    """Whether two normal-form samples ask the same: equal chat messages, the same images (pixel for pixel) and the
    same videos (frame for frame, sampled alike)."""
    videos_a, videos_b = a.get("videos") or (), b.get("videos") or ()
    if a["prompt"] != b["prompt"] or len(a["images"]) != len(b["images"]) or len(videos_a) != len(videos_b):
        return False
    return all(x is y or x == y for x, y in zip(a["images"], b["images"])) and all(x.same_as(y) for x, y in zip(videos_a, videos_b))


def distinct_prompts(samples: Sequence[dict]) -> tuple[list[int], list[int] | None]:
    """(the first sample of each distinct prompt, in order; each sample's index into those, or None when every
    sample asks its own): the samples of a group (`num_generations`) ask the same prompt."""
    first: list[int] = []
    rows = []
    for i, sample in enumerate(samples):
        match = next((k for k, j in enumerate(first) if same_prompt(samples[j], sample)), None)
        if match is None:
            first.append(i)
            match = len(first) - 1
        rows.append(match)
    return first, rows if len(first) < len(samples) else None


def prompt_lengths(processor, samples: Sequence[dict], batch_size: int = 32) -> list[int]:
    """Each sample's prompt length in tokens, image tokens included, as `encode_prompts` makes it."""
    lengths = []
    for start in range(0, len(samples), batch_size):
        batch = encode_prompts(processor, [samples[i] for i in range(start, min(start + batch_size, len(samples)))])
        lengths += batch["attention_mask"].sum(dim=1).tolist()
    return lengths


def drop_long_prompts(processor, dataset: PromptDataset, max_prompt_length: int, what: str = "train_data") -> PromptDataset:
    """`dataset` (`what`: the field that named it) without the prompts longer than `max_prompt_length` (image and video
    tokens included); a ConfigError when none is left.

    Dropped before batching, identically on every rank, so that every rank keeps full batches.
    """
    lengths = prompt_lengths(processor, dataset)
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if len(keep) < len(dataset):
        dropped = [f"{dataset.rows[i]['_source']} ({n} tokens)" for i, n in enumerate(lengths) if n > max_prompt_length]
        if not keep:
            raise ConfigError(
                f"{what}: every prompt is longer than max_prompt_length={max_prompt_length} (skip_long_prompts dropped all "
                f"{len(dropped)}, e.g. {dropped[0]}). Raise max_prompt_length or lower the processor's max_pixels"
            )
        logger.warning(f"skip_long_prompts: dropped {len(dropped)} {what} prompt(s) longer than {max_prompt_length} tokens: {', '.join(dropped[:10])}")
    return PromptDataset([dataset.rows[i] for i in keep], dataset.base_dir, dataset.resize)
