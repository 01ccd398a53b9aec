"""Fail-loud checks that every forward which should see the images and videos really does."""

from __future__ import annotations

from typing import Any

import torch

from vlm_rl.models.families import Family, FixedSizeImages, Images, PatchGrid, family_of


class MultimodalIntegrityError(RuntimeError):
    """A forward would silently drop or misalign images; the message names the sample."""


def check_multimodal(
    family: Family,
    config: Any,  # the model's config (vision config, image and video token ids)
    input_ids: torch.Tensor,  # (B, T)
    images: Images,  # the family's image tensors (`Family.image_layout.keys`) that are present
    num_images: list[int],
    sample_names: list[str],
    where: str,
    image_features: tuple[torch.Tensor, ...] | None = None,  # one (features, H) per image, instead of pixel_values
    videos: Images | None = None,  # the family's video tensors (`Family.video_layout.keys`) that are present
    num_videos: list[int] | None = None,  # None: no sample holds a video
    video_features: tuple[torch.Tensor, ...] | None = None,  # one (features, H) per video, instead of pixel_values_videos
) -> None:
    """Raise unless the image (and video) tensors and the image (video) tokens of each sample agree exactly.

    Checked, for images and for videos alike: the tensors describe one item per item of the samples in the batch
    (Qwen: `image_grid_thw` / `video_grid_thw` rows; LLaVA: `pixel_values` rows, or the encoded features); the pixel
    tensor has exactly the rows those items take (Qwen: the patches of each grid), or, when the items come as encoded
    features, each item has the feature rows it produces; each sample has as many image (video) tokens as its items
    produce vision features. Video tensors for a family without video input are an error too.
    """
    batch = input_ids.shape[0]
    if len(num_images) != batch or len(sample_names) != batch:
        raise MultimodalIntegrityError(f"{where}: {batch} rows but {len(num_images)} image counts / {len(sample_names)} names")
    _check_kind("image", family.image_layout, family.image_token, config.image_token_id, config, input_ids, images, num_images,
                sample_names, where, image_features)
    videos = videos or {}
    num_videos = [0] * batch if num_videos is None else num_videos
    if len(num_videos) != batch:
        raise MultimodalIntegrityError(f"{where}: {batch} rows but {len(num_videos)} video counts")
    if family.video_layout is None:
        if videos or video_features is not None or sum(num_videos):
            raise MultimodalIntegrityError(f"{where}: {family.title} takes no video, but the batch holds videos (samples: {', '.join(sample_names)})")
        return
    _check_kind("video", family.video_layout, family.video_token, config.video_token_id, config, input_ids, videos, num_videos,
                sample_names, where, video_features)


def _check_kind(
    kind: str,
    layout: PatchGrid | FixedSizeImages,
    token: str,
    token_id: int,
    config: Any,
    input_ids: torch.Tensor,
    tensors: Images,
    counts: list[int],
    sample_names: list[str],
    where: str,
    features: tuple[torch.Tensor, ...] | None,
) -> None:
    """`check_multimodal` for one kind of vision input (images or videos)."""
    total = sum(counts)
    described = layout.count(tensors, None if features is None else len(features))
    if described != total:
        raise MultimodalIntegrityError(
            f"{where}: {layout.counted_by} has {described} rows but the samples hold {total} {kind}s "
            f"(samples: {', '.join(sample_names)})"
        )
    tokens = layout.tokens(config, tensors, described)  # vision features per item
    pixels_key = layout.keys[0]
    if features is not None:
        rows = [f.shape[0] for f in features]
        if rows != tokens:
            raise MultimodalIntegrityError(
                f"{where}: the encoded {kind} features have {rows} rows per {kind} but the {kind}s give {tokens} "
                f"(samples: {', '.join(sample_names)}); were the features selected for other rows?"
            )
        if pixels_key in tensors:
            raise MultimodalIntegrityError(f"{where}: both {pixels_key} and encoded {kind} features were given")
    pixels = tensors.get(pixels_key)
    n_pixel_rows = 0 if pixels is None else pixels.shape[0]
    expected_rows = sum(layout.pixel_rows(tensors))
    if features is None and n_pixel_rows != expected_rows:
        raise MultimodalIntegrityError(
            f"{where}: {pixels_key} has {n_pixel_rows} patch rows but {layout.counted_by} describes {expected_rows} "
            f"(samples: {', '.join(sample_names)}); were the {kind}s dropped or split wrongly?"
        )
    tokens_per_sample = (input_ids == token_id).sum(dim=1).tolist()  # (B,)
    start = 0
    for i, n in enumerate(counts):
        expected = sum(tokens[start : start + n])
        start += n
        if tokens_per_sample[i] != expected:
            raise MultimodalIntegrityError(
                f"{where}: sample {sample_names[i]} has {tokens_per_sample[i]} {token} tokens but its "
                f"{n} {kind}(s) give {expected} vision features; the prompt and its {kind}s are out of step"
            )


def check_model_inputs(
    model: torch.nn.Module, inputs: dict, num_images: list[int], sample_names: list[str], where: str, num_videos: list[int] | None = None
) -> None:
    """`check_multimodal` for a model of any family (also wrapped) and its forward/generate keyword arguments
    (`num_videos` None: no sample holds a video)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(base)
    encoded = inputs.get("mm_encoder_outputs") or {}
    images = {k: inputs[k] for k in family.image_layout.keys if inputs.get(k) is not None}
    video_keys = family.video_layout.keys if family.video_layout is not None else ("pixel_values_videos", "video_grid_thw")
    videos = {k: inputs[k] for k in video_keys if inputs.get(k) is not None}
    check_multimodal(
        family,
        base.config,
        inputs["input_ids"],
        images,
        num_images,
        sample_names=sample_names,
        where=where,
        image_features=None if encoded.get("image") is None else tuple(encoded["image"].pooler_output),
        videos=videos,
        num_videos=num_videos,
        video_features=None if encoded.get("video") is None else tuple(encoded["video"].pooler_output),
    )
