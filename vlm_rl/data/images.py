"""Images of the normal form: where each comes from (`ImageRef`), how it is read (offline, errors naming the row),
and how a Qwen model's images are sized (`ImageResize`, through qwen-vl-utils).

Sizing. A Qwen-family processor resizes every image to a multiple of `patch_size * 2` pixels on each side with
`min_pixels <= height * width <= max_pixels` (`smart_resize`). qwen-vl-utils' `fetch_image` does the same resize
(Pillow bicubic) and also honours per-image options in the data (`min_pixels`, `max_pixels`, `resized_height`,
`resized_width`, as in the Qwen model cards). With an `ImageResize` (the processor's own bounds and patch size),
`fetch_image` is the one resize that runs: the processor then receives images already on its grid, which its own
`smart_resize` maps to the same size, so it does not resize them again (tests/data/test_images.py checks that the
two agree). Without one (no model at hand: `validate-data` without `--model`, `score`), images stay as stored.

Reading is ours, not `fetch_image`'s: its errors name no file or row, and it would download `http(s)://` images.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_rl.data.errors import field_error

# Per-image sizing options of a Qwen part ({"type": "image", "image": ..., "max_pixels": ...}), read by fetch_image.
RESIZE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


@dataclass
class ImageRef:
    """One image of a sample as the data gives it: `source` is a path (relative to the data file, or absolute),
    a `file://` or `data:image/...;base64,` URI, a URL (refused: nothing is downloaded), datasets' `{"bytes",
    "path"}` or a PIL image; `options` are the part's own sizing options (`RESIZE_OPTIONS`); `field_name` names
    where in the row it is (for errors)."""

    source: Any
    options: dict[str, int] = field(default_factory=dict)
    field_name: str = "image"


@dataclass(frozen=True)
class VideoResize:
    """A Qwen-family video processor's frame sizing: sides a multiple of `patch_size * 2`, each frame's area in
    [min_pixels, max_pixels] (the video processor's `size`)."""

    patch_size: int
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class ImageResize:
    """A Qwen-family processor's image sizing: sides a multiple of `patch_size * 2`, area in [min_pixels, max_pixels];
    `video`: its video processor's frame sizing (`vlm_rl.data.videos`), which travels with it to the dataset."""

    patch_size: int
    min_pixels: int
    max_pixels: int
    video: VideoResize | None = None

    def apply(self, image: Image.Image, options: dict[str, int], where: str, field_name: str) -> Image.Image:
        """`image` resized by qwen-vl-utils' `fetch_image` with these bounds, or the part's own `options`."""
        from qwen_vl_utils import fetch_image

        element = {"image": image, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, **options}
        try:
            return fetch_image(element, image_patch_size=self.patch_size)
        except (ValueError, AssertionError) as e:  # an aspect ratio over 200, min_pixels > max_pixels
            raise field_error(where, field_name, f"image of {image.width}x{image.height} cannot be resized ({e or 'bad sizing options'})",
                              "Fix the image or its min_pixels/max_pixels/resized_height/resized_width.") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, L, P, CMYK, I;16, ...) -> RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode.startswith("I"):
        # 16-bit (I;16, I;16B, ...; or I holding values above 255) -> 8-bit by the high byte; convert("L") would clip.
        import numpy as np

        values = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _decoded(data: bytes, where: str, field_name: str, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as e:
        raise field_error(where, field_name, f"{what} cannot be decoded ({type(e).__name__}: {e})", "Re-encode the image as PNG/JPEG.") from None


def _data_uri(uri: str, where: str, field_name: str) -> Image.Image:
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise field_error(where, field_name, f"unsupported data URI {uri[:40]!r}...", "Use data:image/<type>;base64,<data>.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise field_error(where, field_name, f"the base64 data of {head}, cannot be decoded ({e})", "Re-encode the image.") from None
    return _decoded(data, where, field_name, f"the image in {head},")


def _file(path: Path, where: str, field_name: str) -> Image.Image:
    if not path.exists():
        raise field_error(where, field_name, f"image file {path} does not exist", "Fix the path (relative to the data file) or remove the row.")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as e:
        raise field_error(where, field_name, f"image file {path} cannot be read ({type(e).__name__}: {e})", "Replace or remove the file.") from None


def read_image(source: Any, base_dir: Path, where: str, field_name: str) -> Image.Image:
    """The image `source` names (see `ImageRef`), as stored; a DataError naming `where` and `field_name` otherwise."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict) and source.get("bytes") is not None:
        return _decoded(source["bytes"], where, field_name, "image bytes")
    if isinstance(source, dict):
        source = source.get("path")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise field_error(where, field_name, f"expected an image path, got {type(source).__name__}", "Give a path relative to the data file.")
    if source[:5].lower() == "data:":
        return _data_uri(source, where, field_name)
    if source[:7].lower() == "file://":
        source = source[7:]  # as qwen-vl-utils reads it: file:///abs/path, or file://relative/path
    elif _URL.match(source):
        raise field_error(
            where, field_name, f"image {source} is a URL, and vlm-rl reads local files only (nothing is downloaded)",
            "Download the images first and give their paths (relative to the data file).",
        )
    path = Path(source)
    return _file(path if path.is_absolute() else base_dir / path, where, field_name)


def open_image(ref: Any, base_dir: Path, where: str, resize: ImageResize | None = None) -> Image.Image:
    """The RGB image of `ref` (an `ImageRef`, or a bare source from the `image` column), sized by `resize` (and the
    ref's own options) if given; errors name `where` ("file:line") and the ref's field."""
    ref = ref if isinstance(ref, ImageRef) else ImageRef(ref)
    image = to_rgb(read_image(ref.source, base_dir, where, ref.field_name))
    return image if resize is None else resize.apply(image, ref.options, where, ref.field_name)


def image_digest(image: Image.Image) -> str:
    """'WxH sha256:0123456789ab' of an RGB image's pixels: equal for the same picture however it was stored."""
    return f"{image.width}x{image.height} sha256:{hashlib.sha256(to_rgb(image).tobytes()).hexdigest()[:12]}"
