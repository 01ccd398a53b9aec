"""Each image of a rollout goes through the vision tower once; every later forward of that rollout reuses it.

One PPO iteration would otherwise run the same images through the same frozen tower in `generate`, the
old-policy/value forward, the reference forward, a learned reward model and every training forward. Qwen2-VL
takes the tower's output instead of `pixel_values` (`mm_encoder_outputs`), while `input_ids`,
`attention_mask`, `mm_token_type_ids` and `image_grid_thw` still go in for the M-RoPE positions.

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

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

# Config entries that name or version a tower without changing what it computes.
_NOT_ARCHITECTURE = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures", "_commit_hash"}


def _has_tower(model: nn.Module) -> bool:
    from vlm_rl.families import VISION_MODULES

    return any(isinstance(getattr(model, name, None), nn.Module) for name in VISION_MODULES)


def _tower_of(model: nn.Module) -> nn.Module | None:
    from vlm_rl.families import VISION_MODULES

    return next((m for name in VISION_MODULES if isinstance(m := getattr(model, name, None), nn.Module)), None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The backbone holding the vision tower (`.visual` for the Qwen families, see `vlm_rl.families`) inside
    DDP/DeepSpeed (`.module`), PolicyAndValue (`.policy`), peft (`get_base_model()`), a reward model
    (`.base_backbone`) or a *ForConditionalGeneration (`.model`)."""
    seen = 0
    while not _has_tower(model) and seen < 8:
        seen += 1
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "policy", None), nn.Module):
            model = model.policy
        elif isinstance(getattr(model, "base_backbone", None), nn.Module):
            model = model.base_backbone
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            break
    return model


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VLM however it is wrapped; None for a model without one."""
    return _tower_of(_unwrap(model))


def _tower_adapted(tower: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in tower.modules())


def tower_trains(model: nn.Module) -> bool:
    """True when any parameter of the model's vision tower requires grad, or the tower carries an adapter."""
    tower = vision_tower(model)
    return tower is not None and (any(p.requires_grad for p in tower.parameters()) or _tower_adapted(tower))


def autocast_state(device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast on `device`'s type: features computed in one state are not another's."""
    enabled = torch.is_autocast_enabled(device.type)
    return enabled, torch.get_autocast_dtype(device.type) if enabled else None


def same_tower(a: nn.Module, b: nn.Module) -> tuple[bool, str]:
    """(whether the vision towers of models `a` and `b` compute the same function, why not).

    The same module, or: the same config and attention implementation, and every parameter and buffer of the
    same name, dtype and shape and equal values (compared exactly). ZeRO-3 partitioned copies cannot be
    compared here and count as different."""
    ta, tb = vision_tower(a), vision_tower(b)
    if ta is None or tb is None:
        return False, "no vision tower"
    if ta is tb:
        return True, "the same modules"
    config_a, config_b = ({k: v for k, v in t.config.to_dict().items() if k not in _NOT_ARCHITECTURE} for t in (ta, tb))
    if config_a != config_b or getattr(ta.config, "_attn_implementation", None) != getattr(tb.config, "_attn_implementation", None):
        return False, "a different vision config"
    tensors_a = dict(ta.named_parameters()) | dict(ta.named_buffers())
    tensors_b = dict(tb.named_parameters()) | dict(tb.named_buffers())
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


def split_by_grid(rows: torch.Tensor, image_grid_thw: torch.Tensor, merge_size: int = 1) -> tuple[torch.Tensor, ...]:
    """`rows` (one block of `t*h*w / merge_size**2` rows per image) split into one tensor per image."""
    return tuple(torch.split(rows, (image_grid_thw.prod(-1) // merge_size**2).tolist()))


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
        tower = vision_tower(model)
        if tower is None or id(tower) not in self.towers or _tower_adapted(tower):
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters()):
            return False  # a forward that wants the tower's gradients must run it
        return not self.per_image or autocast_state(self.per_image[0].device) == self.autocast

    def encoder_outputs(self) -> dict[str, BaseModelOutputWithPooling]:
        """`mm_encoder_outputs` for a Qwen2-VL forward or `generate`: a new dict per call (the forward fills the
        dict it is given)."""
        if self.deepstack is None:
            return {"image": BaseModelOutputWithPooling(pooler_output=self.per_image)}
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        levels = len(self.deepstack[0]) if self.deepstack else 0
        deepstack = [tuple(image[level] for image in self.deepstack) for level in range(levels)]
        return {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=self.per_image, deepstack_features=deepstack)}

    def select(self, images: Iterable[int]) -> ImageFeatures:
        images = list(images)
        deepstack = None if self.deepstack is None else tuple(self.deepstack[i] for i in images)
        return replace(self, per_image=tuple(self.per_image[i] for i in images), deepstack=deepstack)

    def to(self, device: torch.device | str) -> ImageFeatures:
        deepstack = None if self.deepstack is None else tuple(tuple(f.to(device) for f in image) for image in self.deepstack)
        return replace(self, per_image=tuple(f.to(device) for f in self.per_image), deepstack=deepstack)


@torch.no_grad()
def encode_images(
    model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, towers: Iterable[int] = ()
) -> ImageFeatures:
    """Run `model`'s vision tower once over the batch's images (no grad, in the current autocast state).

    `towers`: id()s of other towers known to compute the same (see `same_tower`)."""
    base = _unwrap(model)
    out = base.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    levels = getattr(out, "deepstack_features", None)  # per DeepStack layer, one tensor per image
    deepstack = None if levels is None else tuple(zip(*levels)) if levels else tuple(() for _ in out.pooler_output)
    return ImageFeatures(
        per_image=tuple(out.pooler_output),
        towers=frozenset({id(_tower_of(base)), *towers}),
        autocast=autocast_state(pixel_values.device),
        deepstack=deepstack,
    )


@dataclass
class FeatureSharing:
    """Which models of a PPO run read the rollout's image features (decided once, at the start)."""

    enabled: bool  # the policy encodes each rollout's images once
    reference: bool = False
    reward_models: list[tuple[str, nn.Module]] = field(default_factory=list)  # the learned reward models that share
    towers: frozenset[int] = frozenset()
    notes: list[str] = field(default_factory=list)  # who does not share, and why

    def describe(self) -> str:
        if not self.enabled:
            return f"vision features: every forward encodes its own images ({'; '.join(self.notes)})"
        sharing = ["generate", "old-policy", "value", "training forwards"]
        if self.reference:
            sharing.append("reference")
        sharing += [f"reward model {name!r}" for name, _ in self.reward_models]
        line = f"vision features: each rollout image encoded once, shared by {', '.join(sharing)}"
        return line + (f"; not shared: {'; '.join(self.notes)}" if self.notes else "")


def plan_sharing(
    policy: nn.Module, reference: nn.Module | None, reward_models: Sequence[tuple[str, nn.Module]], enabled: bool
) -> FeatureSharing:
    """Decide the sharing for a run: on only where exact (the policy's tower frozen; the reference's and each
    reward model's tower the same, see `same_tower`). `reference` None: the policy with adapters disabled."""
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
    same images with its own processor. An image matches when its grid and every pixel value are equal."""

    def __init__(self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None, features: ImageFeatures):
        self.features = features
        self.pixels = () if image_grid_thw is None else split_by_grid(pixel_values, image_grid_thw)
        self.grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
        self.index: dict[tuple, list[int]] = defaultdict(list)
        for i, (grid, pixels) in enumerate(zip(self.grids, self.pixels)):
            self.index[(grid, float(pixels.double().sum()))].append(i)

    def find(self, model: nn.Module, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> ImageFeatures | None:
        """The features of these images (in order) if `model` may use them and every image is found; else None."""
        if image_grid_thw is None or image_grid_thw.shape[0] == 0 or not self.features.usable_by(model):
            return None
        found = []
        for grid, pixels in zip((tuple(g) for g in image_grid_thw.tolist()), split_by_grid(pixel_values, image_grid_thw)):
            match = next(
                (i for i in self.index.get((grid, float(pixels.double().sum())), ()) if torch.equal(self.pixels[i].to(pixels.device), pixels)),
                None,
            )
            if match is None:
                return None
            found.append(match)
        return self.features.select(found)
