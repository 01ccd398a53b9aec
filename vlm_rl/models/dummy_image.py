"""The vision tower runs on every rank when it runs on any: a rank whose forward has no image runs it on a dummy.

Under ZeRO-3 and FSDP2 the tower's forward gathers its weight shards from every rank, and when the tower trains its
backward reduces its gradients over every rank (DDP's too): a rank whose batch holds no image, or whose micro-batch
holds none, would skip the tower and leave the others waiting for it. So in a run of several processes, a forward
without images whose model encodes pixels (rather than reading a rollout's encoded features, which no rank's
forward then encodes) runs the tower on one small black image where the forward would have run it: right after the
token embedding (a hook on it), before the first decoder layer, adding 0 x the features' sum to the embeddings, so
that the tower's backward also comes where it comes on the other ranks. It changes no number (x + 0 = x). verl does
the same for Qwen2-VL's text-only samples.

Videos run the same tower (a second call in a forward that holds images too). In a run whose data holds videos
(`expect_videos`, said by the trainer on every rank alike) every forward runs the tower once for images and once for
videos, on a dummy image for a kind it lacks, so that every rank's forward calls the tower twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from vlm_rl.models.families import family_of, vision_backbone


_RUN = {"videos": False}  # whether this run's data holds videos (the same on every rank)


def expect_videos(flag: bool) -> None:
    """Say whether this run's data holds videos: then, with several processes, every forward runs the vision tower
    once per kind (images, videos), on a dummy for a kind it lacks."""
    _RUN["videos"] = bool(flag)


def videos_expected() -> bool:
    return _RUN["videos"]


def dummy_passes(has_images: bool, has_videos: bool = False) -> int:
    """How many dummy tower passes a forward holding these kinds needs to call the tower as often as any other rank's."""
    return int(not has_images) + int(_RUN["videos"] and not has_videos)


def several_processes() -> bool:
    """Whether this process is one of several (torch.distributed initialised with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dummy_image_features(model: nn.Module, device: torch.device) -> torch.Tensor:
    """`model`'s vision encoder (tower, projector) run on one small black image (`dummy` of the family's image
    layout) on `device`: the sum of what it returns (DeepStack features included), a scalar in the autograd graph
    when the encoder trains. (`device` is given: reading a weight's would gather it under ZeRO-3.)"""
    base = vision_backbone(model)
    images = {k: v.to(device) for k, v in family_of(base).image_layout.dummy(base.config).items()}
    out = base.get_image_features(**images, return_dict=True)
    deepstack = getattr(out, "deepstack_features", None) or ()
    return sum(t.float().sum() for t in (*out.pooler_output, *(t for level in deepstack for t in level)))


@contextmanager
def tower_on_every_rank(model: nn.Module, has_images: bool, reads_features: bool, has_videos: bool = False) -> Iterator[None]:
    """Around one forward (or one `generate`, whose first forward is the one) of `model`: when this rank has no image
    (`has_images` False; or, in a run with videos, no video) while another rank's forward may run the vision tower
    (several processes, and the model encodes pixels: `reads_features` False), the tower on a dummy image (one per
    missing kind) at the forward's first embedding lookup."""
    passes = dummy_passes(has_images, has_videos)
    if not passes or reads_features or not several_processes():
        yield
        return
    base = vision_backbone(model)
    done = False

    def add_dummy(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        nonlocal done
        if done:
            return None
        done = True
        total = sum(dummy_image_features(base, output.device) for _ in range(passes))
        return output + (0.0 * total).to(output.dtype)

    handle = base.get_input_embeddings().register_forward_hook(add_dummy)
    try:
        yield
    finally:
        handle.remove()
