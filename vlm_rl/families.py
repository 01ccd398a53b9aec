"""What differs between the VLM families vlm-rl trains, in one place.

Every family here is a `*ForConditionalGeneration` that loads with `AutoModelForImageTextToText` and
`AutoProcessor`, holds its backbone at `.model` (vision tower + language model, which `AutoModel` loads alone,
e.g. for a reward model) and its LM head at `.lm_head`. What the rollout, logprobs, value head, integrity
checks, LoRA set-up, SFT, the reward model and compare may need to know beyond that is a field of `Family`;
code elsewhere asks `family_of(model)` and never tests a model's name.

Shared by the three Qwen families: the tokenizer (Qwen2's, with `<|image_pad|>` and friends), the chat
template, `mm_token_type_ids` + `image_grid_thw` as the M-RoPE position inputs (the same ones to `generate`
and every forward), `rope_deltas` cached on the backbone by `generate`, flat patches in `pixel_values` split
per image by `image_grid_thw`, the tower at `.model.visual`, and the language model at
`.model.language_model` (LoRA goes there only). What differs stays inside transformers: Qwen2.5-VL's
windowed vision attention, Qwen3-VL's 16-px patches, interleaved M-RoPE and DeepStack features (the tower's
intermediate features, which `vision_features.ImageFeatures` carries along with the merged ones).

Adding a family is one entry in `FAMILIES` plus its tiny model builders in `vlm_rl/tiny.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlm_rl.errors import UserError

QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# The language model's linear layers in the Qwen families (the vision towers name theirs qkv/proj/fc1/fc2, and
# Qwen2.5-VL's vision MLP gate/up/down_proj, hence `language_model_module` in the LoRA regex).
QWEN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str  # `--family NAME`
    title: str  # for people
    model_type: str  # `config.model_type` of the full model and of its backbone
    build_tiny_config: Callable[[Any], Any]  # tokenizer -> the tiny model's config
    build_tiny_processor: Callable[[], Any]  # () -> the tiny model's processor (with its tokenizer)
    vision_module: str = "visual"  # the vision tower's attribute on the backbone (`model.model.<this>`)
    language_model_module: str = "language_model"  # the language model's attribute on the backbone
    image_token: str = "<|image_pad|>"  # one per vision feature in the prompt (`config.image_token_id`)
    vision_tokens: tuple[str, ...] = QWEN_VISION_TOKENS  # never sampled (suppressed in every generation config)
    position_inputs: tuple[str, ...] = ("mm_token_type_ids", "image_grid_thw")  # passed to generate and every forward
    lora_target_modules: tuple[str, ...] = QWEN_LORA_TARGETS
    deepstack: bool = False  # the tower also returns per-layer features the forward adds to the language model

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision tower of a model of this family, however wrapped (peft, DDP, value head, reward model)."""
        from vlm_rl.vision_features import vision_tower

        tower = vision_tower(model)
        if tower is None:
            raise TypeError(f"{type(model).__name__} has no .{self.vision_module} vision tower")
        return tower


def _tiny(name: str) -> Callable:
    def build(*args):
        from vlm_rl import tiny

        return getattr(tiny, name)(*args)

    build.__name__ = name
    return build


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen2_vl", "Qwen2-VL", "qwen2_vl", _tiny("tiny_config"), _tiny("build_processor")),
        Family("qwen2_5_vl", "Qwen2.5-VL", "qwen2_5_vl", _tiny("tiny_config_qwen2_5_vl"), _tiny("build_processor_qwen2_5_vl")),
        Family(
            "qwen3_vl", "Qwen3-VL", "qwen3_vl", _tiny("tiny_config_qwen3_vl"), _tiny("build_processor_qwen3_vl"), deepstack=True
        ),
    )
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
# Every token any family suppresses: the generation config suppresses those its tokenizer has.
ALL_VISION_TOKENS = tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.vision_tokens))
VISION_MODULES = tuple(dict.fromkeys(f.vision_module for f in FAMILIES.values()))


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
