"""What differs between the VLM families vlm-rl trains, in one place.

Every family here is a `*ForConditionalGeneration` that loads with `AutoModelForImageTextToText` and
`AutoProcessor`, holds its backbone at `.model` (vision encoder + language model, which `AutoModel` loads alone,
e.g. for a reward model) and its LM head at `.lm_head`. What the rollout, logprobs, value head, integrity
checks, LoRA set-up, SFT, the reward model and compare may need to know beyond that is a field or method of
`Family`; code elsewhere asks `family_of(model)` and never tests a model's name.

The three Qwen families share the tokenizer (Qwen2's, with `<|image_pad|>` and friends), the chat template,
M-RoPE positions from `mm_token_type_ids` + `image_grid_thw` (the same ones to `generate` and every forward),
`rope_deltas` cached on the backbone by `generate`, flat patches in `pixel_values` split per image by
`image_grid_thw` (`PatchGrid`), the tower (merger included) at `.model.visual`, and the language model at
`.model.language_model` (LoRA goes there only). What differs stays inside transformers: Qwen2.5-VL's windowed
vision attention, Qwen3-VL's 16-px patches, interleaved M-RoPE and DeepStack features (the tower's intermediate
features, which `vision_features.ImageFeatures` carries along with the merged ones).

Videos (the Qwen families only) are laid out as images are, in their own tensors: `pixel_values_videos` and
`video_grid_thw` (a video's grid has t > 1: two frames make one temporal patch), one `<|video_pad|>` per vision
feature, and `mm_token_type_ids` 2 at video tokens. Their M-RoPE temporal ids differ by family, inside transformers'
`get_rope_index`: Qwen2-VL counts temporal patches (one id each); Qwen2.5-VL spaces them by `second_per_grid_ts`
(seconds per temporal patch, from the sampled frame rate) times `tokens_per_second`, so that tensor is a position
input too (`VIDEO_PATCHES_TIMED`); Qwen3-VL writes each temporal patch's timestamp into the prompt as text
("<0.5 seconds>", from the video metadata the processor is given) and gives every temporal patch its own grid.

LLaVA (a CLIP vision tower, a 2-layer MLP projector and a Qwen2 language model) differs in kind: images resized to
one fixed size, `pixel_values (N_images, 3, H, W)` with no grid (`FixedSizeImages`), the same number of `<image>`
tokens for every image, 1-D positions counted from the attention mask (`position_ids`, as `generate` counts them;
no `mm_token_type_ids`, no `rope_deltas`), the vision encoder in two modules, `.model.vision_tower` and
`.model.multi_modal_projector`, frozen and reused together, and no video input (`Family.video_layout` None).

Adding a family is one entry in `FAMILIES` plus its tiny model builders in `vlm_rl/models/tiny.py` (`TINY_BUILDERS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from vlm_rl.errors import UserError
from vlm_rl.models.tool_template import QWEN_VL_TOOLS_TEMPLATE

QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# Qwen2's linear layers (the language model of every family here). The vision towers name theirs qkv/proj/fc1/fc2
# (CLIP: q/k/v/out_proj, fc1/fc2) and Qwen2.5-VL's vision MLP gate/up/down_proj, hence `language_model_module` in
# the LoRA regex (`Family.lora_target_regex`).
QWEN2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Images = dict[str, torch.Tensor]  # a processor's image tensors, by keyword (`pixel_values`, `image_grid_thw`)


@dataclass(frozen=True)
class PatchGrid:
    """Qwen: each image's patches flattened into `pixel_values (N_patches, D)`, its (t, h, w) patch grid a row of
    `image_grid_thw (N_images, 3)`; `spatial_merge_size`^2 patches make one vision token. Videos are laid out the
    same way in their own tensors (`VIDEO_PATCHES`): `keys` are the pixels, the grid, then any tensor with one
    entry per item (Qwen2.5-VL's `second_per_grid_ts`)."""

    keys: tuple[str, ...] = ("pixel_values", "image_grid_thw")
    counted_by: str = "image_grid_thw"  # the tensor whose rows are the images (named in integrity errors)
    resizable: bool = True  # min_pixels/max_pixels set how many vision tokens an image gets

    @property
    def position_keys(self) -> tuple[str, ...]:
        """The tensors M-RoPE positions are computed from (with `mm_token_type_ids`): the grid and any per-item entry."""
        return self.keys[1:]

    def count(self, images: Images, encoded: int | None) -> int:
        """How many images the tensors describe (`encoded`: how many came as encoded features instead of pixels)."""
        grid = images.get(self.counted_by)
        return 0 if grid is None else grid.shape[0]

    def pixel_rows(self, images: Images) -> list[int]:
        """Rows of `pixel_values` each image should have."""
        grid = images.get(self.counted_by)
        return [] if grid is None else grid.prod(-1).tolist()

    def tokens(self, config: Any, images: Images, n: int) -> list[int]:
        """Vision tokens (= feature rows) of each of the `n` images, for a model with `config`."""
        merge = config.vision_config.spatial_merge_size
        return [p // merge**2 for p in self.pixel_rows(images)]

    def split(self, images: Images) -> list[Images]:
        """One dict of image tensors per image."""
        pixels_key, grid_key, *per_item = self.keys
        pixels = torch.split(images[pixels_key], self.pixel_rows(images))
        extra = {k: images[k] for k in per_item if images.get(k) is not None}
        return [
            {pixels_key: p, grid_key: images[grid_key][i : i + 1], **{k: v[i : i + 1] for k, v in extra.items()}}
            for i, p in enumerate(pixels)
        ]

    def dummy(self, config: Any) -> Images:
        """The image tensors of one small black image, for a model with `config`: a (1, 2m, 2m) patch grid, m the
        spatial merge size (4 vision tokens)."""
        vision = config.vision_config
        merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        rows = (2 * merge) ** 2
        pixels = torch.zeros(rows, vision.in_channels * temporal * patch * patch)
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 2 * merge, 2 * merge]])}


VIDEO_PATCHES = PatchGrid(("pixel_values_videos", "video_grid_thw"), "video_grid_thw")
# Qwen2.5-VL: each video's seconds per temporal patch set its temporal M-RoPE ids (`get_rope_index`)
VIDEO_PATCHES_TIMED = PatchGrid(("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"), "video_grid_thw")


@dataclass(frozen=True)
class FixedSizeImages:
    """LLaVA: each image resized to the tower's input size, one row of `pixel_values (N_images, 3, H, W)`; every
    image gives (image_size / patch_size)^2 vision tokens (plus the CLS token with `vision_feature_select_strategy`
    "full")."""

    keys: tuple[str, ...] = ("pixel_values",)
    counted_by: str = "pixel_values"
    resizable: bool = False

    def count(self, images: Images, encoded: int | None) -> int:
        pixels = images.get("pixel_values")
        return pixels.shape[0] if pixels is not None else encoded or 0

    def pixel_rows(self, images: Images) -> list[int]:
        return [1] * self.count(images, None)

    def tokens(self, config: Any, images: Images, n: int) -> list[int]:
        vision = config.vision_config
        cls = 1 if config.vision_feature_select_strategy == "full" else 0
        return [(vision.image_size // vision.patch_size) ** 2 + cls] * n

    def split(self, images: Images) -> list[Images]:
        return [{"pixel_values": p} for p in images["pixel_values"].split(1)]

    def dummy(self, config: Any) -> Images:
        """The image tensors of one black image at the tower's input size."""
        vision = config.vision_config
        return {"pixel_values": torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)}


def join_images(per_image: list[Images], keys: tuple[str, ...]) -> Images:
    """The image tensors of several images in one batch (`split`'s inverse); {} for none."""
    return {k: torch.cat([image[k] for image in per_image]) for k in keys} if per_image else {}


def images_of_rows(layout: PatchGrid | FixedSizeImages, images: Images, num_images: Sequence[int], rows: Sequence[int]) -> tuple[Images, list[int]]:
    """(the image tensors of the samples `rows`, in that order (a row may repeat); the indices of those images among
    all the samples' images). `images`: every sample's images, `num_images[i]` of them for sample i, in order."""
    first = list(accumulate(num_images, initial=0))  # each sample's first image
    chosen = [j for r in rows for j in range(first[r], first[r] + num_images[r])]
    per_image = layout.split(images) if first[-1] else []
    return join_images([per_image[j] for j in chosen], layout.keys), chosen


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions of the real tokens of a left- or right-padded batch, 0 on padding: what `generate` computes.
    (B, T) -> (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@dataclass(frozen=True)
class Family:
    name: str  # `--family NAME`
    title: str  # for people
    model_type: str  # `config.model_type` of the full model and of its backbone
    vision_module: str = "visual"  # the vision tower's attribute on the backbone (`model.model.<this>`)
    projector_module: str | None = None  # the module between tower and language model, when not inside the tower
    # top-level config entries that, beside the tower's own config, decide the image features
    feature_config: tuple[str, ...] = ()
    language_model_module: str = "language_model"  # the language model's attribute on the backbone
    image_token: str = "<|image_pad|>"  # one per vision feature in the prompt (`config.image_token_id`)
    vision_tokens: tuple[str, ...] = QWEN_VISION_TOKENS  # never sampled (suppressed in every generation config)
    image_layout: PatchGrid | FixedSizeImages = field(default_factory=PatchGrid)  # how the processor lays out images
    mrope: bool = True  # positions from `mm_token_type_ids` + `image_grid_thw` (M-RoPE); else 1-D from the mask
    lora_target_modules: tuple[str, ...] = QWEN2_LORA_TARGETS  # the default LoRA targets (language model only)
    deepstack: bool = False  # the tower also returns per-layer features the forward adds to the language model
    video_layout: PatchGrid | None = VIDEO_PATCHES  # how the processor lays out videos; None: the family takes no video
    video_token: str = "<|video_pad|>"  # one per video feature in the prompt (`config.video_token_id`)
    # the chat template that shows tools where the processor's own cannot (models/tool_template.py); None: refused
    tool_template: str | None = None

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision tower of a model of this family, however wrapped (peft, DDP, value head, reward model)."""
        tower = vision_tower(model)
        if tower is None:
            raise TypeError(f"{type(model).__name__} has no .{self.vision_module} vision tower")
        return tower

    def vision_encoder(self, model: nn.Module) -> tuple[nn.Module, ...]:
        """The modules that turn pixels into the language model's image features (tower, and projector where it
        is separate): what `freeze_vision_tower` freezes and vision-feature reuse stands for."""
        self.vision_tower(model)  # a clear error without one
        return vision_encoder(model)

    def position_inputs(
        self, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor | None, images: Images, videos: Images | None = None
    ) -> dict:
        """What a forward over a whole sequence (no KV cache) computes its positions from, so that they are the
        ones `generate` used: M-RoPE's `mm_token_type_ids` + `image_grid_thw` (+ the videos' `video_grid_thw`, and
        Qwen2.5-VL's `second_per_grid_ts`), or LLaVA's `position_ids`."""
        if not self.mrope:
            return {"position_ids": positions_from_mask(attention_mask)}
        inputs = {"mm_token_type_ids": mm_token_type_ids, "image_grid_thw": images.get("image_grid_thw")}
        if videos and self.video_layout is not None:
            inputs.update({k: videos.get(k) for k in self.video_layout.position_keys})
        return {k: v for k, v in inputs.items() if v is not None}

    def positions(self, backbone: nn.Module, inputs: dict) -> torch.Tensor:
        """The positions of every token of `inputs` (a forward's or `generate`'s keyword arguments over whole,
        left-padded sequences) as `generate` gives them: M-RoPE's `(3, B, T)` from the backbone's `get_rope_index`,
        else `(B, T)` counted from the attention mask. For a forward that continues from a KV cache, which cannot
        compute them itself."""
        mask = inputs["attention_mask"]
        if not self.mrope:
            return positions_from_mask(mask)
        keys = ("image_grid_thw", *(self.video_layout.position_keys if self.video_layout is not None else ()))
        grids = {k: inputs[k] for k in keys if inputs.get(k) is not None}  # the images' and videos' position inputs
        if not grids:  # text only: the three axes are the 1-D position
            return positions_from_mask(mask)[None].expand(3, -1, -1)
        positions, _ = backbone.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], attention_mask=mask, **grids)
        return positions

    def lora_target_regex(self, target_modules: list[str] | tuple[str, ...] | None = None) -> str:
        """peft `target_modules`: `target_modules` (default: the family's) inside the language model only."""
        names = "|".join(target_modules or self.lora_target_modules)
        return rf".*{self.language_model_module}.*\.({names})$"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen2_vl", "Qwen2-VL", "qwen2_vl", tool_template=QWEN_VL_TOOLS_TEMPLATE),
        Family("qwen2_5_vl", "Qwen2.5-VL", "qwen2_5_vl", video_layout=VIDEO_PATCHES_TIMED, tool_template=QWEN_VL_TOOLS_TEMPLATE),
        Family("qwen3_vl", "Qwen3-VL", "qwen3_vl", deepstack=True, tool_template=QWEN_VL_TOOLS_TEMPLATE),
        Family(
            "llava",
            "LLaVA (CLIP + Qwen2)",
            "llava",
            vision_module="vision_tower",
            projector_module="multi_modal_projector",
            feature_config=("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias"),
            image_token="<image>",
            vision_tokens=("<image>",),
            image_layout=FixedSizeImages(),
            mrope=False,
            video_layout=None,
        ),
    )
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
# Every token any family suppresses: the generation config suppresses those its tokenizer has.
ALL_VISION_TOKENS = tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.vision_tokens))
VISION_MODULES = tuple(dict.fromkeys(f.vision_module for f in FAMILIES.values()))
# The vision tower's attribute -> the separate projector's (None where the tower holds its own merger)
PROJECTOR_OF = {f.vision_module: f.projector_module for f in FAMILIES.values()}


def get_family(name: str) -> Family:
    """The family called `name` (`--family NAME`); a UserError naming the choices otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}: choose one of {', '.join(FAMILIES)}") from None


def _config_of(obj: Any) -> Any:
    """The model config of a config, or of a model however wrapped."""
    seen = 0
    while seen < 8 and not hasattr(obj, "model_type"):
        seen += 1
        config = getattr(obj, "config", None)
        if config is not None and not callable(config) and hasattr(config, "model_type"):
            return config
        for attr in ("module", "policy", "base_backbone"):
            inner = getattr(obj, attr, None)
            if isinstance(inner, nn.Module):
                obj = inner
                break
        else:
            if hasattr(obj, "get_base_model"):
                obj = obj.get_base_model()
            else:
                break
    return obj


def family_of(obj: Any) -> Family:
    """The family of a loaded model (any wrapper), its config, or a `config.model_type` string."""
    model_type = obj if isinstance(obj, str) else getattr(_config_of(obj), "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        supported = ", ".join(f"{f.title} ({f.model_type})" for f in FAMILIES.values())
        raise UserError(f"model type {model_type!r} is not a supported VLM family: vlm-rl trains {supported}")
    return family


def _has_tower(model: nn.Module) -> bool:
    return any(isinstance(getattr(model, name, None), nn.Module) for name in VISION_MODULES)


def vision_backbone(model: nn.Module) -> nn.Module:
    """The backbone holding the vision tower (`.visual`, LLaVA's `.vision_tower`: `Family.vision_module`) inside
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


def vision_encoder(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of a VLM, however wrapped, that turn pixels into the language model's image features: the
    vision tower, then its family's separate projector if any (LLaVA's `multi_modal_projector`); () without a tower."""
    base = vision_backbone(model)
    for name, projector in PROJECTOR_OF.items():
        tower = getattr(base, name, None)
        if isinstance(tower, nn.Module):
            return (tower,) + ((getattr(base, projector),) if projector else ())
    return ()


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision tower of a VLM however it is wrapped (the first module of `vision_encoder`); None without one."""
    encoder = vision_encoder(model)
    return encoder[0] if encoder else None


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning last_hidden_state, lm_head) of a *ForConditionalGeneration, also when wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "lm_head") or not hasattr(base, "model"):
        raise TypeError(f"expected a *ForConditionalGeneration model with .model and .lm_head, got {type(base).__name__}")
    return base.model, base.lm_head
