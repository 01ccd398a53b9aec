"""Fail-loud checks that every forward which should see the images really does."""

from __future__ import annotations

import torch


class MultimodalIntegrityError(RuntimeError):
    """A forward would silently drop or misalign images; the message names the sample."""


def check_multimodal(
    input_ids: torch.Tensor,  # (B, T)
    pixel_values: torch.Tensor | None,  # (N_patches, D)
    image_grid_thw: torch.Tensor | None,  # (N_images, 3)
    num_images: list[int],
    image_token_id: int,
    merge_size: int,
    sample_names: list[str],
    where: str,
    image_features: tuple[torch.Tensor, ...] | None = None,  # one (features, H) per image, instead of pixel_values
) -> None:
    """Raise unless the image tensors and the image-pad tokens of each sample agree exactly.

    Checked: `image_grid_thw` has one row per image of the samples in the batch; `pixel_values` has
    exactly the patches those rows describe (or, when the images come as encoded `image_features`, each
    image has the feature rows its grid gives: patches / merge_size^2); each sample has as many
    `<|image_pad|>` tokens as its images produce vision features.
    """
    batch = input_ids.shape[0]
    if len(num_images) != batch or len(sample_names) != batch:
        raise MultimodalIntegrityError(f"{where}: {batch} rows but {len(num_images)} image counts / {len(sample_names)} names")
    total_images = sum(num_images)
    n_grid = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    if n_grid != total_images:
        raise MultimodalIntegrityError(
            f"{where}: image_grid_thw has {n_grid} rows but the samples hold {total_images} images "
            f"(samples: {', '.join(sample_names)})"
        )
    patches = image_grid_thw.prod(-1).tolist() if image_grid_thw is not None else []
    if image_features is not None:
        rows = [f.shape[0] for f in image_features]
        expected = [p // merge_size**2 for p in patches]
        if rows != expected:
            raise MultimodalIntegrityError(
                f"{where}: the encoded image features have {rows} rows per image but image_grid_thw gives {expected} "
                f"(samples: {', '.join(sample_names)}); were the features selected for other rows?"
            )
        if pixel_values is not None:
            raise MultimodalIntegrityError(f"{where}: both pixel_values and encoded image features were given")
    n_pixel_rows = 0 if pixel_values is None else pixel_values.shape[0]
    if image_features is None and n_pixel_rows != sum(patches):
        raise MultimodalIntegrityError(
            f"{where}: pixel_values has {n_pixel_rows} patch rows but image_grid_thw describes {sum(patches)} "
            f"(samples: {', '.join(sample_names)}); were the images dropped or split wrongly?"
        )
    tokens_per_sample = (input_ids == image_token_id).sum(dim=1).tolist()  # (B,)
    start = 0
    for i, n in enumerate(num_images):
        expected = sum(patches[start : start + n]) // (merge_size**2)
        start += n
        if tokens_per_sample[i] != expected:
            raise MultimodalIntegrityError(
                f"{where}: sample {sample_names[i]} has {tokens_per_sample[i]} <|image_pad|> tokens but its "
                f"{n} image(s) give {expected} vision features; the prompt and its images are out of step"
            )


def check_model_inputs(model: torch.nn.Module, inputs: dict, num_images: list[int], sample_names: list[str], where: str) -> None:
    """`check_multimodal` for a Qwen2-VL (also peft-wrapped) and its forward/generate keyword arguments."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    check_multimodal(
        inputs["input_ids"],
        inputs.get("pixel_values"),
        inputs.get("image_grid_thw"),
        num_images,
        image_token_id=base.config.image_token_id,
        merge_size=base.config.vision_config.spatial_merge_size,
        sample_names=sample_names,
        where=where,
        image_features=None if encoded is None else tuple(encoded.pooler_output),
    )
