"""Videos of the normal form: where each comes from (`VideoRef`), how it is decoded, sampled and sized (qwen-vl-utils'
`fetch_video`), and what the processor receives (`Video`: the sampled frames and the metadata the Qwen processors
read timestamps from).

Sources. A video file (a path relative to the data file, absolute, or `file://`), read by qwen-vl-utils' decoding
backend; a list of frame images (any image source `vlm_rl.data.images` reads, in order), which needs no decoder; or a
directory of frame images (its image files in name order). URLs are refused (nothing is downloaded).

Sampling and sizing are qwen-vl-utils': from a file, `nframes` frames, or `fps` frames per second of video (default
2, between `min_frames` and `max_frames`), from `video_start` to `video_end` seconds; always an even number of frames
(two frames make one temporal patch). A frame list is used whole (padded to an even count by repeating its last
frame); `sample_fps` says its rate (default 2). Each frame is resized to a multiple of `patch_size * 2` pixels per
side with `min_pixels <= H * W <= max_pixels`, and `max_pixels` is further capped so that all frames together stay
within `total_pixels` (per frame: `total_pixels * 2 / frames`). With a `VideoResize` (the processor's own bounds),
the bounds are the processor's unless the part gives its own; the processor's own resize then keeps the frames as
they are.

Backend. qwen-vl-utils picks its decoder once per process (`FORCE_QWENVL_VIDEO_READER`, else torchcodec, else decord,
else torchvision). vlm-rl picks `decord` (a pip wheel with FFmpeg inside, in vlm-rl's dependencies on x86_64), or the
backend named by `FORCE_QWENVL_VIDEO_READER` when that is set, before the first file is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_rl.data.errors import field_error
from vlm_rl.data.images import VideoResize, read_image, to_rgb
from vlm_rl.errors import UserError

# Per-video options of a Qwen part ({"type": "video", "video": ..., "fps": ...}), read by fetch_video.
SIZE_OPTIONS = ("min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width")
FILE_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end")  # sampling a video file
FRAME_LIST_OPTIONS = ("sample_fps",)  # the rate of a list of frames (qwen-vl-utils' default: 2)
VIDEO_OPTIONS = SIZE_OPTIONS + FILE_OPTIONS + FRAME_LIST_OPTIONS
DEFAULT_BACKEND = "decord"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_FRAME_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass
class VideoRef:
    """One video of a sample as the data gives it: `source` is a path (file or directory of frames), a `file://`
    URI, a URL (refused) or a list of frame-image sources; `options` are the part's own `VIDEO_OPTIONS`;
    `field_name` names where in the row it is (for errors)."""

    source: Any
    options: dict[str, Any] = field(default_factory=dict)
    field_name: str = "video"


@dataclass(frozen=True, eq=False)
class Video:
    """A video as the processor receives it: the sampled, sized frames and where they were taken from."""

    frames: torch.Tensor  # (T, 3, H, W) uint8, T even
    fps: float  # frames per second of the source (of a frame list: its `sample_fps`)
    frame_indices: tuple[int, ...]  # the source frame each frame was taken from
    total_frames: int  # frames in the source (in the range read)
    name: str  # the file, or "N frames", for messages and reports

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return int(self.frames.shape[-1]), int(self.frames.shape[-2])

    def metadata(self):
        """transformers' `VideoMetadata`: Qwen2.5-VL's processor reads the sampled rate from it (its M-RoPE time
        steps), Qwen3-VL's the frame timestamps it writes into the prompt."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(
            total_num_frames=self.total_frames, fps=self.fps, width=self.size[0], height=self.size[1], frames_indices=list(self.frame_indices)
        )

    def same_as(self, other: Video) -> bool:
        """The same frames, taken from the same source positions at the same rate (what the processor reads)."""
        if self is other:
            return True
        same_sampling = (self.fps, self.frame_indices, self.total_frames) == (other.fps, other.frame_indices, other.total_frames)
        return same_sampling and self.frames.shape == other.frames.shape and torch.equal(self.frames, other.frames)

    def frame_images(self) -> list[Image.Image]:
        """The frames as RGB PIL images (for reports and thumbnails)."""
        return [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in self.frames]

    def describe(self) -> str:
        """'8 frames 56x56 at 2 fps from clip.mp4'."""
        width, height = self.size
        return f"{len(self.frames)} frames {width}x{height} at {self.fps:g} fps from {self.name}"


def video_backend() -> str:
    """The qwen-vl-utils backend this process decodes video files with: `FORCE_QWENVL_VIDEO_READER` if set, else
    decord; made qwen-vl-utils' choice before its first use. A UserError when it is not installed."""
    import importlib.util

    from qwen_vl_utils import vision_process

    name = os.environ.get("FORCE_QWENVL_VIDEO_READER") or DEFAULT_BACKEND
    if name not in vision_process.VIDEO_READER_BACKENDS:
        raise UserError(f"FORCE_QWENVL_VIDEO_READER={name!r}: qwen-vl-utils reads video with {', '.join(vision_process.VIDEO_READER_BACKENDS)}")
    if importlib.util.find_spec(name) is None:
        raise UserError(
            f"reading video files needs the {name!r} package, which is not installed: `pip install decord` (x86_64 "
            "wheels bring their own FFmpeg), or give each video as a list (or directory) of frame images"
        )
    if vision_process.FORCE_QWENVL_VIDEO_READER != name:
        vision_process.FORCE_QWENVL_VIDEO_READER = name
        vision_process.get_video_reader_backend.cache_clear()
    return name


def _frame_sources(source: Any, base_dir: Path, where: str, field_name: str) -> list[tuple[Any, str]] | None:
    """[(frame source, its field name)] when `source` is a list of frames or a directory of frame images; None
    for a video file."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise field_error(where, field_name, "an empty list of frames", "Give at least one frame image.")
        return [(s, f"{field_name}[{i}]") for i, s in enumerate(source)]
    path = _local_path(source, base_dir, where, field_name)
    if not path.is_dir():
        return None
    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in _FRAME_EXTENSIONS)
    if not frames:
        raise field_error(where, field_name, f"directory {path} holds no frame images", "Put the frames (e.g. 000.png, 001.png, ...) in it.")
    return [(str(p), f"{field_name} ({p.name})") for p in frames]


def _local_path(source: Any, base_dir: Path, where: str, field_name: str) -> Path:
    if isinstance(source, dict):
        source = source.get("path")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise field_error(where, field_name, f"expected a video path or a list of frames, got {type(source).__name__}",
                          "Give a path relative to the data file, or a list of frame images.")
    if source[:7].lower() == "file://":
        source = source[7:]
    elif _URL.match(source) or source[:5].lower() == "data:":
        raise field_error(where, field_name, f"video {source[:60]} is not a local file (vlm-rl reads local files only; nothing is downloaded)",
                          "Download the video first and give its path (relative to the data file).")
    path = Path(source)
    return path if path.is_absolute() else base_dir / path


def _checked_options(ref: VideoRef, from_file: bool, where: str) -> dict:
    options = dict(ref.options)
    wrong = [k for k in (FRAME_LIST_OPTIONS if from_file else FILE_OPTIONS) if k in options]
    if wrong:
        what = "a video file is sampled by fps/nframes (sample_fps is the rate of a list of frames)" if from_file else \
            "a list of frames is used whole (fps, nframes, min/max_frames and video_start/end sample a video file)"
        raise field_error(where, ref.field_name, f"option(s) {wrong} do not apply: {what}", "Remove them.")
    if "fps" in options and "nframes" in options:
        raise field_error(where, ref.field_name, "both fps and nframes given", "Give one: nframes frames, or fps frames per second.")
    return options


def _probe(path: Path, backend: str, element: dict, where: str, field_name: str) -> None:
    """Open the file with the backend and check the part's sampling options against its length and rate with
    qwen-vl-utils' own rules, so that a file the backend cannot read, or a sampling it cannot do, is an error naming
    the row (`fetch_video` would fall back to torchvision's reader, which fails in this environment, and report that)."""
    if backend != "decord":
        return
    import decord
    from qwen_vl_utils import vision_process

    try:
        reader = decord.VideoReader(str(path))
    except Exception as e:
        raise field_error(where, field_name, f"video file {path} cannot be decoded by decord ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                          "Re-encode it (e.g. H.264 in .mp4) or give its frames as images.") from None
    total, fps = len(reader), reader.get_avg_fps()
    try:
        _, _, in_range = vision_process.calculate_video_frame_range(element, total, fps)
        vision_process.smart_nframes(element, total_frames=in_range, video_fps=fps)
    except (ValueError, AssertionError) as e:
        raise field_error(where, field_name, f"video {path} ({total} frames at {fps:g} fps) cannot be sampled so ({e})",
                          "Fix the part's fps, nframes, min_frames, max_frames, video_start or video_end.") from None


def open_video(ref: Any, base_dir: Path, where: str, resize: VideoResize | None = None) -> Video:
    """The video `ref` names (a `VideoRef`, or a bare source from the `videos` column), sampled and sized by
    qwen-vl-utils with `resize`'s bounds (else qwen-vl-utils' defaults for a 14-px patch) and the ref's own options;
    errors name `where` ("file:line") and the ref's field."""
    from qwen_vl_utils import fetch_video

    ref = ref if isinstance(ref, VideoRef) else VideoRef(ref)
    frames = _frame_sources(ref.source, base_dir, where, ref.field_name)
    options = _checked_options(ref, frames is None, where)
    bounds = {} if resize is None else {"min_pixels": resize.min_pixels, "max_pixels": resize.max_pixels}
    element: dict[str, Any] = {**bounds, **options}
    if frames is None:
        path = _local_path(ref.source, base_dir, where, ref.field_name)
        if not path.exists():
            raise field_error(where, ref.field_name, f"video file {path} does not exist", "Fix the path (relative to the data file) or remove the row.")
        _probe(path, video_backend(), element, where, ref.field_name)
        element["video"], name = str(path), str(ref.source if isinstance(ref.source, str) else path)
    else:
        element["video"] = [to_rgb(read_image(source, base_dir, where, name)) for source, name in frames]
        name = str(ref.source) if isinstance(ref.source, str) else f"{len(frames)} frames"
    try:
        video, metadata = fetch_video(element, image_patch_size=resize.patch_size if resize else 14, return_video_metadata=True)
    except Exception as e:  # min_pixels > max_pixels, an aspect ratio over 200, a decoder failure, ...
        raise field_error(where, ref.field_name, f"video {name} cannot be sampled or sized ({e or 'bad options'})",
                          f"Fix the video or its options ({', '.join(VIDEO_OPTIONS)}).") from None
    indices = metadata["frames_indices"]
    indices = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return Video(
        frames=video.round().clamp(0, 255).to(torch.uint8),  # integral already: the resize ran on uint8 frames
        fps=float(metadata["fps"]),
        frame_indices=tuple(int(i) for i in indices),
        total_frames=int(round(float(metadata["total_num_frames"]))),
        name=name,
    )
