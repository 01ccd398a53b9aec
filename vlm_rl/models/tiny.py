"""Build the embedded tiny models, one per family, randomly initialised, with their processors, offline.

The default (`qwen2_vl`) directory loads with `Qwen2VLForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` exactly like a local copy of `Qwen/Qwen2-VL-2B-Instruct`: same model
class, same tokenizer class, the same special tokens and chat template, a real `Qwen2VLProcessor`.
`qwen2_5_vl` and `qwen3_vl` do the same for Qwen2.5-VL and Qwen3-VL (their model classes, vision towers
and processors; the same tokenizer). `llava` is a `LlavaForConditionalGeneration` (a CLIP vision tower, the MLP
projector, a Qwen2 language model) with a real `LlavaProcessor`: a `CLIPImageProcessor` and the same tokenizer plus
LLaVA's `<image>` token, in a ChatML template that writes `<image>` for each image. Every directory loads with
`AutoModelForImageTextToText` too. The Qwen processors hold a video processor with the same per-frame pixel bounds
as their image processor, so the tiny Qwen models take videos (LLaVA takes none).
Only the sizes are small, so the demo, the tests and the benchmarks run on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaProcessor,
    Qwen2Config,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from trl.chat_template_utils import qwen2_5_vl_chat_template

from vlm_rl.atomic import atomic_dir
from vlm_rl.cache import cache_dir

from vlm_rl.data.synthetic import COLOURS, COUNT_WORDS, POSITIONS, SHAPES
from vlm_rl.models.families import FAMILIES, get_family

# Qwen2-VL's special tokens, in the order the real vocabulary lists them after its BPE tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# One image is 28x28 pixels per merged vision token: 4 to 36 tokens per image.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 36

BPE_VOCAB_SIZE = 768


def _training_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: chat scaffolding plus the synthetic task's words."""
    words = COLOURS + SHAPES + POSITIONS + COUNT_WORDS + [str(i) for i in range(10)]
    lines = [
        "system\nYou are a helpful assistant.",
        "user\n",
        "assistant\n",
        "What colour is the shape? What shape is it? How many shapes are there?",
        "Where is the shape? Answer with one word. The answer is",
        "Describe the image. A picture of a red square on the left.",
    ]
    for w in words:
        lines.append(f"{w} {w.capitalize()} {w}. the {w} a {w},")
    for colour in COLOURS:
        for shape in SHAPES:
            lines.append(f"There is a {colour} {shape} in the picture.")
    return lines * 4


def build_tokenizer() -> Qwen2Tokenizer:
    """Train a byte-level BPE with Qwen2's pre-tokenizer and wrap it in Qwen2's tokenizer class."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer=trainer)
    model_json = json.loads(backend.to_str())["model"]
    vocab = model_json["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        errors="replace",
        model_max_length=32768,
        extra_special_tokens=SPECIAL_TOKENS[1:],
    )
    # As Qwen2-VL-*-Instruct: eos is the end of a turn (= the model config's eos_token_id), pad is <|endoftext|>.
    # Left at Qwen2Tokenizer's default (<|endoftext|>), transformers' Trainer rewrites the model config's eos_token_id
    # to <|endoftext|> at train() time. Set after construction so that the special tokens keep Qwen2's id order.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = qwen2_5_vl_chat_template
    return tokenizer


def build_processor() -> Qwen2VLProcessor:
    tokenizer = build_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=qwen2_5_vl_chat_template,
    )


def _text_config(tokenizer: Qwen2Tokenizer, mrope: bool = True, **extra) -> dict:
    """The language model shared by the tiny families: hidden 64, 2 layers; special ids read from the tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # head_dim = 64 / 4 = 16; M-RoPE sections (temporal, height, width) sum to head_dim / 2.
    sections = {"mrope_section": [2, 3, 3]} if mrope else {}
    rope = {"rope_type": "default", "rope_theta": 10000.0, **sections, **extra.pop("rope", {})}
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def _vision_token_ids(tokenizer: Qwen2Tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def tiny_config(tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    """A Qwen2-VL config a few hundred thousand parameters large; special ids read from the tokenizer."""
    return Qwen2VLConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_vision_token_ids(tokenizer),
    )


def _merger_vision_config(**extra) -> dict:
    """The vision tower of Qwen2.5-VL and Qwen3-VL: 2 blocks of width 32, merged 2x2 into the text width (64)."""
    return dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, spatial_merge_size=2, temporal_patch_size=2, **extra
    )


def tiny_config_qwen2_5_vl(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL: windowed attention in the vision tower (window 56 px = 2x2 merged tokens), full attention in
    its last block, an MLP merger to the text width."""
    return Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer),
        vision_config=_merger_vision_config(patch_size=14, window_size=56, fullatt_block_indexes=[1]),
        **_vision_token_ids(tokenizer),
    )


def tiny_config_qwen3_vl(tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """Qwen3-VL: 16-pixel patches, learned position embeddings (12x12), interleaved M-RoPE and DeepStack
    (block 1's features added to the first language-model layers)."""
    return Qwen3VLConfig(
        text_config=_text_config(tokenizer, head_dim=16, rope={"mrope_interleaved": True}),
        vision_config=_merger_vision_config(patch_size=16, num_position_embeddings=144, deepstack_visual_indexes=[1]),
        **_vision_token_ids(tokenizer),
    )


def build_processor_qwen2_5_vl() -> Qwen2_5_VLProcessor:
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        chat_template=qwen2_5_vl_chat_template,
    )


# Qwen3-VL merges 2x2 patches of 16 px: 32x32 pixels per vision token, 4 to 36 tokens per image as above.
QWEN3_MIN_PIXELS = 32 * 32 * 4
QWEN3_MAX_PIXELS = 32 * 32 * 36


def build_processor_qwen3_vl() -> Qwen3VLProcessor:
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, min_pixels=QWEN3_MIN_PIXELS, max_pixels=QWEN3_MAX_PIXELS),
        tokenizer=build_tokenizer(),
        # each frame sized as an image is (Qwen3-VL's default would make every frame at least 128 vision tokens)
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS}),
        chat_template=qwen2_5_vl_chat_template,
    )


# LLaVA: every image resized to 56x56 (the whole scene, no crop), 14-px patches: 4x4 = 16 <image> tokens per image.
LLAVA_IMAGE_SIZE = 56
LLAVA_PATCH_SIZE = 14
LLAVA_IMAGE_TOKEN = "<image>"
# Qwen2-VL's ChatML template with LLaVA's placeholder: one <image> per image, which the processor repeats per token.
LLAVA_CHAT_TEMPLATE = qwen2_5_vl_chat_template.replace("<|vision_start|><|image_pad|><|vision_end|>", LLAVA_IMAGE_TOKEN)


def build_processor_llava() -> LlavaProcessor:
    """A real `LlavaProcessor`: CLIP's image processor (CLIP mean/std) and the tiny tokenizer with `<image>` added."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([LLAVA_IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    size = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False),
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",  # the CLS token is dropped ...
        num_additional_image_tokens=1,  # ... from the tower's patches + CLS, as in LLaVA-1.5
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def tiny_config_llava(tokenizer: Qwen2Tokenizer) -> LlavaConfig:
    """LLaVA: a CLIP vision tower (2 blocks of width 32, 56x56 images), the 2-layer GELU MLP projector to the text
    width, a Qwen2 language model (1-D RoPE). Features from the tower's last block (LLaVA-1.5 takes the
    penultimate of 24: with 2 blocks that would leave one block without a use)."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=Qwen2Config(**_text_config(tokenizer, mrope=False)),
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


# The version in each family's cache name, where it is not 1 (see resolve_model_path).
TINY_VERSIONS = {"qwen3_vl": 2}

# family -> (tokenizer -> the tiny model's config, () -> its processor with its tokenizer)
TINY_BUILDERS = {
    "qwen2_vl": (tiny_config, build_processor),
    "qwen2_5_vl": (tiny_config_qwen2_5_vl, build_processor_qwen2_5_vl),
    "qwen3_vl": (tiny_config_qwen3_vl, build_processor_qwen3_vl),
    "llava": (tiny_config_llava, build_processor_llava),
}


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, family: str = "qwen2_vl", overwrite: bool = False) -> Path:
    """Write the tiny model of `family` (see `vlm_rl.models.families`), its processor and tokenizer to `out_dir`
    (atomically). Same seed, same bytes.

    A non-empty `out_dir` is refused (before anything is built) unless `overwrite`, which replaces it whole."""
    get_family(family)  # an unknown family is refused before anything is written
    build_config, build_processor_of_family = TINY_BUILDERS[family]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        processor = build_processor_of_family()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(build_config(processor.tokenizer))
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """'tiny' -> the embedded tiny Qwen2-VL (built once into the cache); 'tiny-<family>' (e.g. 'tiny-qwen2_5_vl')
    -> that family's tiny model; anything else is returned as is."""
    name = str(name_or_path)
    if name == "tiny":
        family = "qwen2_vl"
    elif name.startswith("tiny-") and not Path(name).exists():
        family = name[len("tiny-") :]
        if family not in FAMILIES:
            return name
    else:
        return name
    # The name carries a version: bump it whenever the files change, so that no stale cache is reused
    # (v2: the tokenizer's eos is <|im_end|>; qwen3_vl v2: its video processor sizes frames as its images).
    path = cache_dir() / ("tiny-qwen2-vl-v2-seed0" if family == "qwen2_vl" else f"tiny-{family}-v{TINY_VERSIONS.get(family, 1)}-seed0")
    if not (path / "config.json").exists():
        make_tiny_model(path, seed=0, family=family, overwrite=True)  # the cache is vlm-rl's own: a broken one is rebuilt
    return str(path)
