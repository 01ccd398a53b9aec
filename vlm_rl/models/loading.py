"""Load the policy, its reference and its processor the same way for a tiny model and for Qwen2-VL-2B (any family
of `vlm_rl.models.families`, through the Auto classes).

The reference is the model as it is when PPO starts, computing exactly as the policy does (before any update
KL(policy || reference) is 0, token for token):
  full fine-tuning          a frozen copy of the starting checkpoint (or `ref_model_name_or_path`) in the policy's
                            weight dtype (fp32 under --bf16, as the policy's master weights; bf16 with bf16_weights);
  fresh LoRA adapter        no copy: the policy with its adapters disabled;
  continuing an SFT adapter a frozen copy of the starting adapter on its own base, unmerged as the policy's is.
With `kl_coef` 0 (no KL term, TRL's `beta` 0) there is no reference at all.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlm_rl.data.images import ImageResize
from vlm_rl.data.videos import VideoResize
from vlm_rl.errors import UserError
from vlm_rl.models.families import Family, family_of
from vlm_rl.models.tiny import resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def require_model(name_or_path: str) -> str:
    """`name_or_path` resolved ('tiny' is built once); a UserError saying "not found" when it names no local model
    or adapter directory and cannot be a hub model either (it looks like a path, or HF_HUB_OFFLINE is set and the
    hub cache does not hold it)."""
    path = resolve_model_path(name_or_path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists() and not is_adapter_dir(local):
            raise UserError(f"model directory {local} has no config.json or {ADAPTER_CONFIG}: not a model or peft adapter. Give the directory the model was saved to.")
        return path
    if local.exists():
        raise UserError(f"model {path} is a file, not a directory. Give a local model directory, a peft adapter directory, or 'tiny'.")
    fix = "Give a local model directory, a peft adapter directory, or 'tiny'"
    if not HUB_ID.fullmatch(path):
        raise UserError(f"model directory {path} not found ({local.absolute()} does not exist). {fix}.")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise UserError(
                f"model {path} not found: no such local directory, and the hub is not asked (HF_HUB_OFFLINE is set; "
                f"vlm-rl sets it unless you do) nor does its cache hold {path}. {fix}, or download it first."
            )
    return path


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def adapter_base_path(adapter_dir: str | os.PathLike) -> str:
    """The (resolved) base model a peft adapter directory was trained on."""
    return resolve_model_path(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])


def language_model_lora_config(r: int, alpha: int, dropout: float, target_modules: list[str] | None, family: Family, **kwargs):
    """A peft LoraConfig on `family`'s language model only (`target_modules`, default the family's): the regex
    skips the vision tower (Qwen2.5-VL's vision MLP also has gate/up/down_proj, CLIP q/k/v_proj)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=family.lora_target_regex(target_modules), **kwargs)


def torch_dtype_for(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def load_vlm(path: str, dtype: torch.dtype) -> nn.Module:
    """`AutoModelForImageTextToText.from_pretrained(path)`, refused unless it is of a supported family."""
    config_path = Path(path) / "config.json"
    if config_path.exists():
        family_of(json.loads(config_path.read_text()).get("model_type"))  # a UserError before any weights load
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    family_of(model)
    return model


def load_base_model(path: str, dtype: torch.dtype) -> nn.Module:
    """A full checkpoint, or the base named by an adapter with the adapter merged in."""
    path = require_model(path)
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_vlm(adapter_base_path(path), dtype=dtype)
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    if not (Path(path) / "config.json").exists():
        raise UserError(f"model {path} not found locally (no {path}/config.json): give a local model directory (no hub downloads here)")
    return load_vlm(path, dtype=dtype)


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor saved with the model (for an adapter: with the adapter, else with its base)."""
    path = require_model(path)
    source = path
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        source = adapter_base_path(path)
    processor = AutoProcessor.from_pretrained(source)
    edges = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
    model_dir = adapter_base_path(path) if is_adapter_dir(path) else path  # an adapter has no model config
    if edges and not family_of(AutoConfig.from_pretrained(model_dir)).image_layout.resizable:
        raise UserError(
            f"min_pixels/max_pixels: {source} resizes every image to its vision tower's fixed input size, so the "
            "number of vision tokens per image cannot change; leave min_pixels and max_pixels unset for it"
        )
    if edges:  # the Qwen families' image size bounds, in pixels (min_pixels/max_pixels are transformers' deprecated names)
        processor.image_processor.size = {**dict(processor.image_processor.size), **edges}
    processor.tokenizer.padding_side = "left"
    return processor


def image_resize(path: str, processor) -> ImageResize | None:
    """How images (and videos) are sized for the model at `path` before its `processor` sees them: for the Qwen
    families, the processor's own bounds and patch size, applied by qwen-vl-utils (`vlm_rl.data.images`; the video
    processor's per-frame bounds in `.video`, `vlm_rl.data.videos`); None for a family whose processor resizes every
    image to one fixed size (LLaVA), which then does it alone."""
    from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE

    model_dir = adapter_base_path(path) if is_adapter_dir(path) else path
    images = processor.image_processor
    if not family_of(AutoConfig.from_pretrained(model_dir)).image_layout.resizable or images.merge_size != SPATIAL_MERGE_SIZE:
        return None
    videos = getattr(processor, "video_processor", None)
    video = None if videos is None else VideoResize(videos.patch_size, videos.size["shortest_edge"], videos.size["longest_edge"])
    return ImageResize(images.patch_size, images.size["shortest_edge"], images.size["longest_edge"], video)


def load_reference(path: str, dtype: torch.dtype) -> nn.Module:
    """A frozen reference from `path`: a full checkpoint in `dtype`, or a peft adapter on its base (in `dtype`; the
    adapter in fp32, as peft loads a policy's), not merged, so that it computes as a policy continuing it does."""
    path = require_model(path)
    if is_adapter_dir(path):
        from peft import PeftModel

        return freeze(PeftModel.from_pretrained(load_vlm(adapter_base_path(path), dtype=dtype), path))
    return freeze(load_base_model(path, dtype))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_policy_and_reference(config) -> tuple[nn.Module, nn.Module | None]:
    """(trainable policy, frozen reference or None when the reference is the policy with adapters disabled, or when
    the run has no KL term: `config.kl_coef` 0, as TRL's `beta` 0, loads no reference at all).

    Mixed precision as in the Trainer: `--bf16`/`--fp16` set the compute dtype (autocast), while the
    weights the optimiser updates stay fp32 (the master weights), unless `bf16_weights` asks for
    bf16 weights to save memory. A LoRA policy's frozen base is held in the compute dtype, its adapters
    in fp32 (peft's `autocast_adapter_dtype`); the reference is held as the policy is.
    """
    dtype = torch_dtype_for(config.bf16, config.fp16)  # compute dtype, for frozen weights
    trained_dtype = dtype if config.bf16_weights else torch.float32
    start = require_model(config.model_name_or_path)
    wants_reference = config.kl_coef != 0
    if is_adapter_dir(start):
        from peft import PeftModel

        base = load_vlm(adapter_base_path(start), dtype=dtype)
        policy = PeftModel.from_pretrained(base, start, is_trainable=True)
        reference = load_reference(config.ref_model_name_or_path or start, dtype) if wants_reference else None
    elif config.use_peft:
        from peft import get_peft_model

        base = load_vlm(start, dtype=dtype)
        lora = language_model_lora_config(
            config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules, family_of(base), task_type="CAUSAL_LM"
        )
        policy = get_peft_model(base, lora)
        reference = load_reference(config.ref_model_name_or_path, dtype) if wants_reference and config.ref_model_name_or_path else None
    else:
        policy = load_vlm(start, dtype=trained_dtype)
        if config.freeze_vision_tower:
            for module in family_of(policy).vision_encoder(policy):
                module.requires_grad_(False)
        reference = load_reference(config.ref_model_name_or_path or start, trained_dtype) if wants_reference else None
    if config.activation_checkpointing:  # `gradient_checkpointing` is transformers' deprecated alias of it
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs=config.activation_checkpointing_kwargs or {"use_reentrant": False})
        policy.config.use_cache = False
    return policy, reference
