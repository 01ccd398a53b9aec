"""A batch's videos: their tensors, how many each row holds, and their encoded features, selected with the rows.

They ride in the `Rollout` as one field (`Rollout.videos`, None when no row holds a video), so that the image fields
stay as they were; the video tensors are laid out as the family's `video_layout` says (`vlm_rl.models.families`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vlm_rl.models.families import Family, Images, PatchGrid, join_images
from vlm_rl.models.vision_features import ImageFeatures


@dataclass
class VideoBatch:
    layout: PatchGrid
    tensors: Images  # pixel_values_videos (N_patches, D), video_grid_thw (N_videos, 3)[, second_per_grid_ts (N_videos,)]
    counts: list[int]  # videos per row
    features: ImageFeatures | None = None  # the vision tower's output per video, encoded once

    @classmethod
    def from_query(cls, query: dict, family: Family, features: ImageFeatures | None = None) -> VideoBatch | None:
        """The videos of `encode_prompts`' output (`num_videos` and the video tensors); None when it holds none."""
        counts = query.get("num_videos")
        if not counts or not sum(counts):
            return None
        if family.video_layout is None:
            raise ValueError(f"{family.title} takes no video, but the batch holds {sum(counts)}")
        tensors = {k: query[k] for k in family.video_layout.keys if query.get(k) is not None}
        return cls(family.video_layout, tensors, list(counts), features)

    @staticmethod
    def concat(parts: list[VideoBatch | None], rows: list[int]) -> VideoBatch | None:
        """The videos of batches of `rows` rows each (None: a batch without video) in order; the encoded features only
        when every batch with videos has them (`ImageFeatures.concat`)."""
        present = [p for p in parts if p is not None]
        if not present:
            return None
        counts = [c for p, n in zip(parts, rows) for c in (p.counts if p is not None else [0] * n)]
        layout = present[0].layout
        tensors = join_images([video for p in present for video in p.per_video()], layout.keys)
        features = [p.features for p in present]
        return VideoBatch(layout, tensors, counts, None if None in features else ImageFeatures.concat(features))

    def per_video(self) -> list[Images]:
        """The tensors of each video, in batch order."""
        return self.layout.split(self.tensors)

    def select(self, indices: list[int]) -> VideoBatch | None:
        """The videos of rows `indices`, in that order (None when those rows hold none)."""
        first = [sum(self.counts[:i]) for i in range(len(self.counts))]  # each row's first video
        chosen = [j for i in indices for j in range(first[i], first[i] + self.counts[i])]
        if not chosen:
            return None
        per_video = self.per_video()
        features = None if self.features is None else self.features.select(chosen)
        return VideoBatch(self.layout, join_images([per_video[j] for j in chosen], self.layout.keys), [self.counts[i] for i in indices], features)

    def to(self, device: torch.device | str) -> VideoBatch:
        features = None if self.features is None else self.features.to(device)
        return replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()}, features=features)
