"""Fail-loud checks that every forward which should see the images really does."""

from __future__ import annotations

from typing import Any

import torch

from vlm_rl.models.families import Family, Images, family_of


class MultimodalIntegrityError(RuntimeError):
    """A forward would silently drop or misalign images; the message names the sample."""


def check_multimodal(
    family: Family,
    config: Any,  # the model's config (vision config, image token id)
    input_ids: torch.Tensor,  # (B, T)
    images: Images,  # the family's image tensors (`Family.image_layout.keys`) that are present
    num_images: list[int],
    sample_names: list[str],
    where: str,
    image_features: tuple[torch.Tensor, ...] | None = None,  # one (features, H) per image, instead of pixel_values
) -> None:
    """Raise unless the image tensors and the image tokens of each sample agree exactly.

    Checked: the image tensors describe one image per image of the samples in the batch (Qwen: `image_grid_thw`
    rows; LLaVA: `pixel_values` rows, or the encoded features); `pixel_values` has exactly the rows those images
    take (Qwen: the patches of each grid), or, when the images come as encoded `image_features`, each image has
    the feature rows it produces; each sample has as many image tokens as its images produce vision features.
    """
    batch = input_ids.shape[0]
    if len(num_images) != batch or len(sample_names) != batch:
        raise MultimodalIntegrityError(f"{where}: {batch} rows but {len(num_images)} image counts / {len(sample_names)} names")
    layout = family.image_layout
    total_images = sum(num_images)
    described = layout.count(images, None if image_features is None else len(image_features))
    if described != total_images:
        raise MultimodalIntegrityError(
            f"{where}: {layout.counted_by} has {described} rows but the samples hold {total_images} images "
            f"(samples: {', '.join(sample_names)})"
        )
    tokens = layout.tokens(config, images, described)  # vision features per image
    if image_features is not None:
        rows = [f.shape[0] for f in image_features]
        if rows != tokens:
            raise MultimodalIntegrityError(
                f"{where}: the encoded image features have {rows} rows per image but the images give {tokens} "
                f"(samples: {', '.join(sample_names)}); were the features selected for other rows?"
            )
        if "pixel_values" in images:
            raise MultimodalIntegrityError(f"{where}: both pixel_values and encoded image features were given")
    pixels = images.get("pixel_values")
    n_pixel_rows = 0 if pixels is None else pixels.shape[0]
    expected_rows = sum(layout.pixel_rows(images))
    if image_features is None and n_pixel_rows != expected_rows:
        raise MultimodalIntegrityError(
            f"{where}: pixel_values has {n_pixel_rows} patch rows but {layout.counted_by} describes {expected_rows} "
            f"(samples: {', '.join(sample_names)}); were the images dropped or split wrongly?"
        )
    tokens_per_sample = (input_ids == config.image_token_id).sum(dim=1).tolist()  # (B,)
    start = 0
    for i, n in enumerate(num_images):
        expected = sum(tokens[start : start + n])
        start += n
        if tokens_per_sample[i] != expected:
            raise MultimodalIntegrityError(
                f"{where}: sample {sample_names[i]} has {tokens_per_sample[i]} {family.image_token} tokens but its "
                f"{n} image(s) give {expected} vision features; the prompt and its images are out of step"
            )


def check_model_inputs(model: torch.nn.Module, inputs: dict, num_images: list[int], sample_names: list[str], where: str) -> None:
    """`check_multimodal` for a model of any family (also wrapped) and its forward/generate keyword arguments."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(base)
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    images = {k: inputs[k] for k in family.image_layout.keys if inputs.get(k) is not None}
    check_multimodal(
        family,
        base.config,
        inputs["input_ids"],
        images,
        num_images,
        sample_names=sample_names,
        where=where,
        image_features=None if encoded is None else tuple(encoded.pooler_output),
    )
