"""Videos in TRL's SFT: TRL 1.16's vision-language collator reads images only, so a dataset with videos keeps each
video as its frames (PNG-encoded, as the images are) plus its metadata, and `VideoCollator` (TRL's collator) hands
the rebuilt `Video`s to the processor beside the images, the way `vlm_rl.data.prompts.encode_prompts` does for PPO:
the same frames, the same metadata, so SFT and PPO see a clip as the same tokens.

Only TRL's prompt-completion format takes videos (one assistant answer per sample); a conversation with several
assistant turns and a video is refused (TRL's language-modeling path renders messages inside the processor's own
chat template, which would read the video again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_rl.data.prompts import video_kwargs
from vlm_rl.data.videos import Video

VIDEO_COLUMNS = ("videos", "video_metadata")


def stored_videos(videos: list[Video]) -> dict[str, list]:
    """A sample's videos as SFT dataset columns: the frames as PIL images, and what `Video` holds besides them."""
    return {
        "videos": [video.frame_images() for video in videos],
        "video_metadata": [
            {"fps": v.fps, "frame_indices": list(v.frame_indices), "total_frames": v.total_frames, "name": v.name} for v in videos
        ],
    }


def video_features():
    """The `datasets` features of `stored_videos`' columns (the frames PNG-encoded, decoded per batch)."""
    import datasets

    metadata = {"fps": datasets.Value("float64"), "frame_indices": datasets.List(datasets.Value("int64")),
                "total_frames": datasets.Value("int64"), "name": datasets.Value("string")}
    return {"videos": datasets.List(datasets.List(datasets.Image())), "video_metadata": datasets.List(metadata)}


def rebuilt_videos(example: dict) -> list[Video]:
    """The `Video`s of one stored example (the inverse of `stored_videos`)."""
    videos = []
    for frames, meta in zip(example.get("videos") or [], example.get("video_metadata") or []):
        pixels = torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in frames])).permute(0, 3, 1, 2).contiguous()
        videos.append(Video(pixels, float(meta["fps"]), tuple(meta["frame_indices"]), int(meta["total_frames"]), meta["name"]))
    return videos


class _ProcessorWithVideos:
    """The processor, with the batch's videos added to the one call that also receives the images (the prompts')."""

    def __init__(self, processor, videos: dict):
        self._processor, self._videos = processor, videos

    def __call__(self, *args, **kwargs):
        if "images" in kwargs:
            kwargs = {**kwargs, **self._videos}
        return self._processor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


@dataclass
class VideoCollator(DataCollatorForVisionLanguageModeling):
    """TRL's `DataCollatorForVisionLanguageModeling` for examples that may hold videos (`stored_videos` columns):
    prompt-completion examples with videos are collated by TRL's own code (chat template, left-padded prompts,
    completion-only labels, flush-left, truncation), with the videos passed to the processor with the prompts."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        videos = [rebuilt_videos(example) for example in examples]
        examples = [{k: v for k, v in example.items() if k not in VIDEO_COLUMNS} for example in examples]
        if not any(videos):
            return super().torch_call(examples)
        if "messages" in examples[0]:
            raise ValueError("SFT on conversations with several assistant turns takes no video; give one answer per video sample")
        processor = self.processor
        self.processor = _ProcessorWithVideos(processor, video_kwargs(processor, [{"videos": v} for v in videos]))
        try:
            return super().torch_call(examples)
        finally:
            self.processor = processor
