"""Each image of a rollout goes through the vision tower once; every later forward of that rollout reuses it.

One PPO iteration would otherwise run the same images through the same frozen tower in `generate`, the
old-policy/value forward, the reference forward, a learned reward model and every training forward. Every family
takes the vision encoder's output instead of `pixel_values` (`mm_encoder_outputs`), while the position inputs
still go in (`Family.position_inputs`: M-RoPE's `mm_token_type_ids` and `image_grid_thw`, LLaVA's `position_ids`).
The vision encoder is the tower, plus LLaVA's projector, which sits outside it (`vision_encoder`).

Each distinct image is encoded once, whatever the number of samples that show it: a group of `num_generations`
samples of one prompt, or two prompts about the same picture, read the same features (`distinct`: pixel-identical
images, compared by every tensor that describes them, so another kind of media, a video's `pixel_values_videos` and
`video_grid_thw`, keys apart from images by its tensors' names).

Videos go through the same tower (`get_video_features`) once per rollout too (`encode_videos`); their features
travel in an `ImageFeatures` of their own (one entry per video) and go in as `mm_encoder_outputs["video"]`. A
forward takes encoded features for every kind it holds or for none (transformers refuses pixels beside encoded
features).

Reuse is exact or off. `ImageFeatures` records which towers they stand for (the one that encoded them and
those proven to hold the same weights), and the autocast state they were computed in; a forward uses them
only when its model's tower is one of those and it runs in the same autocast state, else it encodes its own
pixels. Towers are "the same" when they are the same modules, or hold equal parameters and buffers (compared
exactly, once, when the trainer starts) with the same config; and a tower shares only while nothing in it
trains.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm_rl.models.dummy_image import dummy_image_features, several_processes, videos_expected
from vlm_rl.models.families import Images, family_of, join_images, vision_backbone, vision_encoder, vision_tower

# Config entries that name or version a tower without changing what it computes.
_NOT_ARCHITECTURE = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures", "_commit_hash"}


def _adapted(modules: tuple[nn.Module, ...]) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for module in modules for m in module.modules())


def _requires_grad(modules: tuple[nn.Module, ...]) -> bool:
    return any(p.requires_grad for module in modules for p in module.parameters())


def tower_trains(model: nn.Module) -> bool:
    """True when any parameter of the model's vision encoder requires grad, or the encoder carries an adapter."""
    encoder = vision_encoder(model)
    return bool(encoder) and (_requires_grad(encoder) or _adapted(encoder))


def autocast_state(device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast on `device`'s type: features computed in one state are not another's."""
    enabled = torch.is_autocast_enabled(device.type)
    return enabled, torch.get_autocast_dtype(device.type) if enabled else None


def _encoder_config(model: nn.Module) -> tuple[dict, Any, dict]:
    """What decides a model's image features besides its weights: the tower's config, its attention implementation,
    and the family's `feature_config` entries of the model's config (LLaVA's feature layer, projector)."""
    tower, base = vision_tower(model), vision_backbone(model)
    extra = {k: getattr(base.config, k) for k in family_of(base).feature_config}
    own = {k: v for k, v in tower.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    return own, getattr(tower.config, "_attn_implementation", None), extra


def _encoder_tensors(encoder: tuple[nn.Module, ...]) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": t for i, m in enumerate(encoder) for n, t in (*m.named_parameters(), *m.named_buffers())}


def same_tower(a: nn.Module, b: nn.Module) -> tuple[bool, str]:
    """(whether the vision encoders of models `a` and `b` compute the same function, why not).

    The same modules, or: the same config and attention implementation, and every parameter and buffer of the
    same name, dtype and shape and equal values (compared exactly). ZeRO-3 partitioned copies cannot be
    compared here and count as different."""
    ea, eb = vision_encoder(a), vision_encoder(b)
    if not ea or not eb:
        return False, "no vision tower"
    if len(ea) == len(eb) and all(x is y for x, y in zip(ea, eb)):
        return True, "the same modules"
    if _encoder_config(a) != _encoder_config(b):
        return False, "a different vision config"
    tensors_a, tensors_b = _encoder_tensors(ea), _encoder_tensors(eb)
    if tensors_a.keys() != tensors_b.keys():
        return False, "different vision tower modules"
    for name, x in tensors_a.items():
        y = tensors_b[name]
        if x is y:
            continue
        if hasattr(x, "ds_id") or hasattr(y, "ds_id"):
            return False, "a ZeRO-3 partitioned copy (its weights cannot be compared)"
        if x.dtype != y.dtype:
            return False, f"vision weights in {y.dtype} vs {x.dtype}"
        if x.shape != y.shape or not torch.equal(x.detach(), y.detach().to(x.device)):
            return False, f"different vision weights ({name})"
    return True, "equal vision weights"


@dataclass(frozen=True)
class ImageFeatures:
    """The vision tower's output for each image of a batch, and the towers and autocast state it stands for."""

    per_image: tuple[torch.Tensor, ...]  # one (tokens of the image, text hidden size) per image, in batch order
    towers: frozenset[int]  # id() of the vision towers whose output these are
    autocast: tuple[bool, torch.dtype | None]
    # Qwen3-VL's DeepStack: per image, one (tokens of the image, text hidden size) per DeepStack layer; None when
    # the family has none (`Family.deepstack`)
    deepstack: tuple[tuple[torch.Tensor, ...], ...] | None = None

    def usable_by(self, model: nn.Module) -> bool:
        """True when `model`'s own tower, in the current autocast state, would compute exactly these features (and
        no gradient of the tower is wanted)."""
        encoder = vision_encoder(model)
        if not encoder or id(encoder[0]) not in self.towers or _adapted(encoder):
            return False
        if torch.is_grad_enabled() and _requires_grad(encoder):
            return False  # a forward that wants the encoder's gradients must run it
        return not self.per_image or autocast_state(self.per_image[0].device) == self.autocast

    def encoder_outputs(self, modality: str = "image") -> dict[str, BaseModelOutputWithPooling]:
        """`mm_encoder_outputs` for a forward or `generate` of any family: a new dict per call (the forward fills
        the dict it is given). `modality`: "image", or "video" for the features of videos."""
        if self.deepstack is None:
            return {modality: BaseModelOutputWithPooling(pooler_output=self.per_image)}
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        levels = len(self.deepstack[0]) if self.deepstack else 0
        deepstack = [tuple(image[level] for image in self.deepstack) for level in range(levels)]
        return {modality: BaseModelOutputWithDeepstackFeatures(pooler_output=self.per_image, deepstack_features=deepstack)}

    @staticmethod
    def concat(parts: list[ImageFeatures]) -> ImageFeatures | None:
        """The images of `parts` in order; None unless all stand for the same towers in the same autocast state."""
        first = parts[0]
        if any(p.towers != first.towers or p.autocast != first.autocast or (p.deepstack is None) != (first.deepstack is None) for p in parts):
            return None
        deepstack = None if first.deepstack is None else tuple(d for p in parts for d in p.deepstack)
        return replace(first, per_image=tuple(f for p in parts for f in p.per_image), deepstack=deepstack)

    def select(self, images: Iterable[int]) -> ImageFeatures:
        images = list(images)
        deepstack = None if self.deepstack is None else tuple(self.deepstack[i] for i in images)
        return replace(self, per_image=tuple(self.per_image[i] for i in images), deepstack=deepstack)

    def to(self, device: torch.device | str) -> ImageFeatures:
        deepstack = None if self.deepstack is None else tuple(tuple(f.to(device) for f in image) for image in self.deepstack)
        return replace(self, per_image=tuple(f.to(device) for f in self.per_image), deepstack=deepstack)


def distinct(items: Sequence[Images]) -> list[int]:
    """For each item (one image's tensors, `Family.image_layout.split`), the index of the first item equal to it in
    every tensor (itself when it is the first of its kind)."""
    index: dict[tuple, list[int]] = defaultdict(list)
    first = []
    for i, item in enumerate(items):
        candidates = index[_image_key(item)]
        match = next((j for j in candidates if _equal(items[j], item)), None)
        if match is None:
            candidates.append(i)
        first.append(i if match is None else match)
    return first


@torch.no_grad()
def encode_images(
    model: nn.Module,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None = None,
    towers: Iterable[int] = (),
    device: torch.device | None = None,
    deduplicate: bool = True,
) -> ImageFeatures:
    """Run `model`'s vision encoder once over the batch's distinct images (no grad, in the current autocast state);
    an image equal to an earlier one (`distinct`) gets that one's features, the same tensors. `image_grid_thw`: the
    Qwen families' patch grids (LLaVA's fixed-size images have none). `deduplicate` False: every image encoded.

    `towers`: id()s of other towers known to compute the same (see `same_tower`). A batch without images
    (`pixel_values` None; `device`: the batch's) has features for no image, which stand for the same towers as any
    other rank's: every rank's forwards then read features, or none does; with several processes its tower runs
    on a dummy image, as the other ranks' do on theirs (dummy_image.py)."""
    base = vision_backbone(model)
    if pixel_values is None:
        if several_processes():
            dummy_image_features(base, device)
        deepstack = () if family_of(base).deepstack else None
        return ImageFeatures(per_image=(), towers=frozenset({id(vision_tower(base)), *towers}), autocast=autocast_state(device), deepstack=deepstack)
    layout = family_of(base).image_layout
    images = {"pixel_values": pixel_values, **({} if image_grid_thw is None else {"image_grid_thw": image_grid_thw})}
    per_image, deepstack = _encode_distinct(layout, images, lambda inputs: base.get_image_features(**inputs, return_dict=True), deduplicate)
    towers = frozenset({id(vision_tower(base)), *towers})
    return ImageFeatures(per_image=per_image, towers=towers, autocast=autocast_state(pixel_values.device), deepstack=deepstack)


def _encode_distinct(layout, tensors: Images, encode, deduplicate: bool) -> tuple[tuple, tuple | None]:
    """(per item of `tensors` (images or videos laid out as `layout` says), its features; per item, its DeepStack
    features or None): `encode` (the tower's `get_image_features` or `get_video_features` on a batch of items) run
    once over the distinct items (`distinct`; every item with `deduplicate` False), an item equal to an earlier one
    given that one's features, the same tensors."""
    items = layout.split(tensors)
    first = distinct(items) if deduplicate else list(range(len(items)))
    encoded = sorted(set(first))  # the items the tower runs on, in batch order
    out = encode(join_images([items[i] for i in encoded], layout.keys) if len(encoded) < len(items) else tensors)
    levels = getattr(out, "deepstack_features", None)  # per DeepStack layer, one tensor per encoded item
    row = {item: k for k, item in enumerate(encoded)}  # encoded item -> its row of the tower's output
    deepstack = None
    if levels is not None:
        per_encoded = tuple(zip(*levels)) if levels else tuple(() for _ in out.pooler_output)
        deepstack = tuple(per_encoded[row[f]] for f in first)
    return tuple(out.pooler_output[row[f]] for f in first), deepstack


PIXEL_KEYS = {"image": "pixel_values", "video": "pixel_values_videos"}  # each kind's pixels among a forward's inputs


def with_encoded_features(model: nn.Module, inputs: dict, features: dict[str, ImageFeatures | None]) -> dict:
    """`inputs` (a forward's or `generate`'s keyword arguments) with the pixels of each kind they hold ("image",
    "video") replaced by that kind's encoded `features` (`mm_encoder_outputs`), when `model` may use the features of
    every kind present (`ImageFeatures.usable_by`); else `inputs` as they are (transformers takes pixels or encoded
    features, never both)."""
    present = [kind for kind, key in PIXEL_KEYS.items() if inputs.get(key) is not None]
    if not present or any(features.get(kind) is None or not features[kind].usable_by(model) for kind in present):
        return inputs
    encoded = {PIXEL_KEYS[kind] for kind in present}
    out = {k: v for k, v in inputs.items() if k not in encoded}
    out["mm_encoder_outputs"] = {kind: features[kind].encoder_outputs(kind)[kind] for kind in present}
    return out


@torch.no_grad()
def encode_videos(
    model: nn.Module, videos: Images, towers: Iterable[int] = (), device: torch.device | None = None, deduplicate: bool = True
) -> ImageFeatures | None:
    """Run `model`'s vision encoder once over the batch's distinct videos (`pixel_values_videos`, `video_grid_thw`; no
    grad, in the current autocast state), as `encode_images` over images: one entry per video, for
    `mm_encoder_outputs["video"]`. None for a batch without video (`device`: the batch's), whose tower runs on a dummy
    image when other ranks' may run it on videos (several processes, a run with videos: dummy_image.py)."""
    base = vision_backbone(model)
    pixels = videos.get("pixel_values_videos")
    if pixels is None:
        if several_processes() and videos_expected():
            dummy_image_features(base, device)
        return None
    layout = family_of(base).video_layout
    tensors = {k: videos[k] for k in layout.keys if videos.get(k) is not None}

    def encode(inputs: Images):
        return base.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"], return_dict=True)

    per_video, deepstack = _encode_distinct(layout, tensors, encode, deduplicate)
    towers = frozenset({id(vision_tower(base)), *towers})
    return ImageFeatures(per_image=per_video, towers=towers, autocast=autocast_state(pixels.device), deepstack=deepstack)


@dataclass
class FeatureSharing:
    """Which models of a PPO run read the rollout's image features (decided once, at the start)."""

    enabled: bool  # the policy encodes each rollout's images once
    reference: bool = False
    critic: bool = False  # a separate critic (its own backbone) of the same tower
    reward_models: list[tuple[str, nn.Module]] = field(default_factory=list)  # the learned reward models that share
    towers: frozenset[int] = frozenset()
    notes: list[str] = field(default_factory=list)  # who does not share, and why

    def describe(self) -> str:
        if not self.enabled:
            return f"vision features: every forward encodes its own images ({'; '.join(self.notes)})"
        sharing = ["generate", "old-policy", "value", "training forwards"]
        if self.reference:
            sharing.append("reference")
        if self.critic:
            sharing.append("separate critic")
        sharing += [f"reward model {name!r}" for name, _ in self.reward_models]
        line = f"vision features: each rollout image encoded once, shared by {', '.join(sharing)}"
        return line + (f"; not shared: {'; '.join(self.notes)}" if self.notes else "")


def plan_sharing(
    policy: nn.Module,
    reference: nn.Module | None,
    reward_models: Sequence[tuple[str, nn.Module]],
    enabled: bool,
    critic: nn.Module | None = None,
) -> FeatureSharing:
    """Decide the sharing for a run: on only where exact (the policy's tower frozen; the reference's, a separate
    critic's and each reward model's tower the same and frozen, see `same_tower`). `reference` None: the policy
    with adapters disabled; `critic` None: no separate critic."""
    if vision_tower(policy) is None:
        return FeatureSharing(False, notes=["the policy has no vision tower"])
    if not enabled:
        return FeatureSharing(False, notes=["reuse_vision_features is off"])
    if tower_trains(policy):
        return FeatureSharing(False, notes=["the policy's vision tower trains (freeze_vision_tower=False)"])
    plan = FeatureSharing(True, towers=frozenset({id(vision_tower(policy))}))
    towers = set(plan.towers)
    if reference is None:
        plan.reference = True  # the policy's own tower, which has no adapters (tower_trains is False)
    else:
        plan.reference, why = same_tower(policy, reference)
        if plan.reference:
            towers.add(id(vision_tower(reference)))
        else:
            plan.notes.append(f"reference ({why})")
    if critic is not None:
        plan.critic, why = same_tower(policy, critic)
        if plan.critic and tower_trains(critic):
            plan.critic, why = False, "its vision tower trains"
        if plan.critic:
            towers.add(id(vision_tower(critic)))
        else:
            plan.notes.append(f"separate critic ({why})")
    for name, model in reward_models:
        same, why = same_tower(policy, model)
        if same:
            plan.reward_models.append((name, model))
            towers.add(id(vision_tower(model)))
        else:
            plan.notes.append(f"reward model {name!r} ({why})")
    plan.towers = frozenset(towers)
    return plan


class FeatureLookup:
    """A rollout's image features found again from pixels: for a model (a learned reward model) that encodes the
    same images with its own processor. An image matches when every one of its image tensors (pixels, and the Qwen
    families' grid) is equal. Images come one dict of tensors each (`Family.image_layout.split`)."""

    def __init__(self, images: Sequence[Images], features: ImageFeatures):
        self.features = features
        self.images = list(images)
        self.index: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(self.images):
            self.index[_image_key(image)].append(i)

    def find(self, model: nn.Module, images: Sequence[Images]) -> ImageFeatures | None:
        """The features of these images (in order) if `model` may use them and every image is found; else None."""
        if not images or not self.features.usable_by(model):
            return None
        found = []
        for image in images:
            match = next((i for i in self.index.get(_image_key(image), ()) if _equal(self.images[i], image)), None)
            if match is None:
                return None
            found.append(match)
        return self.features.select(found)


def _image_key(image: Images) -> tuple:
    """A cheap key under which equal images meet: each tensor's name, shape and sum."""
    return tuple((k, tuple(v.shape), float(v.double().sum())) for k, v in sorted(image.items()))


def _equal(a: Images, b: Images) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].to(b[k].device), b[k]) for k in a)
