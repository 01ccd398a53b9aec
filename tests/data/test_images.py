"""Images are read offline and sized once: qwen-vl-utils' `fetch_image` with the processor's bounds, which the
processor's own `smart_resize` then keeps."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

from vlm_rl.data.formats import DataError, load_samples
from vlm_rl.data.images import ImageResize
from vlm_rl.data.videos import VideoResize
from vlm_rl.models.loading import image_resize, load_processor

SIZES = [(56, 84), (60, 90), (200, 150), (30, 20), (1000, 700), (333, 77)]
ONE_LEVEL = 1 / 255 / 0.26130258  # one 8-bit level after the processor's normalisation (its smallest std)


def scene(width: int, height: int) -> Image.Image:
    """Flat shapes on a light background, like the synthetic data (not noise, whose bicubic rounding is large)."""
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.1, height * 0.2, width * 0.6, height * 0.8], fill=(200, 30, 30))
    draw.rectangle([width * 0.5, height * 0.1, width * 0.9, height * 0.5], fill=(30, 30, 200))
    return image


@pytest.fixture(scope="module")
def processor_and_resize(tiny_model_dir):
    processor = load_processor(str(tiny_model_dir))
    return processor, image_resize(str(tiny_model_dir), processor)


def test_the_resize_is_the_processors_bounds_and_patch_size(processor_and_resize):
    processor, resize = processor_and_resize
    size, frames = processor.image_processor.size, processor.video_processor.size
    video = VideoResize(processor.video_processor.patch_size, frames["shortest_edge"], frames["longest_edge"])
    assert resize == ImageResize(processor.image_processor.patch_size, size["shortest_edge"], size["longest_edge"], video)


@pytest.mark.parametrize("bounds", [None, (56 * 56, 112 * 112)])
def test_qwen_vl_utils_and_the_processor_agree(processor_and_resize, bounds):
    """The same patch grid for every size; the same pixels where qwen-vl-utils had nothing to do; within one
    8-bit level elsewhere (Pillow's and torchvision's bicubic round differently)."""
    processor, resize = processor_and_resize
    images = processor.image_processor
    if bounds is not None:
        resize = ImageResize(resize.patch_size, *bounds)
        images = type(images)(**{**images.to_dict(), "size": {"shortest_edge": bounds[0], "longest_edge": bounds[1]}})
    for width, height in SIZES:
        image = scene(width, height)
        alone = images(images=[image], return_tensors="pt")
        resized = resize.apply(image, {}, "x.jsonl:1", "image")
        after = images(images=[resized], return_tensors="pt")
        assert after["image_grid_thw"].tolist() == alone["image_grid_thw"].tolist(), (width, height)
        grid = alone["image_grid_thw"][0].tolist()
        assert (resized.height, resized.width) == (grid[1] * resize.patch_size, grid[2] * resize.patch_size)
        difference = (after["pixel_values"] - alone["pixel_values"]).abs()
        if resized.size == (width, height):
            assert difference.max() == 0, (width, height)
        else:
            assert difference.max() <= 1.01 * ONE_LEVEL and difference.mean() < 0.01 * ONE_LEVEL, (width, height)


def test_a_parts_own_sizing_options_are_honoured(tmp_path, processor_and_resize):
    _, resize = processor_and_resize
    scene(200, 150).save(tmp_path / "a.png")
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png", "max_pixels": 56 * 56}, {"type": "text", "text": "Q"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png", "resized_height": 56, "resized_width": 112}, {"type": "text", "text": "Q"}]}]},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = [s["images"][0].size for s in load_samples(tmp_path / "q.jsonl", resize=resize)]
    assert sizes == [(196, 140), (56, 28), (112, 56)]  # the bounds, then max_pixels (qwen-vl-utils' rounding), then the size given
    assert [s["images"][0].size for s in load_samples(tmp_path / "q.jsonl")] == [(200, 150)] * 3  # no model: as stored


def test_options_on_a_part_without_an_image_are_refused(tmp_path):
    row = {"prompt": [{"role": "user", "content": [{"type": "image", "max_pixels": 3136}, {"type": "text", "text": "Q"}]}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'prompt\[0\]\.content\[0\]': options \['max_pixels'\] on a part without its own image"):
        load_samples(tmp_path / "d.jsonl", check_images=False)
