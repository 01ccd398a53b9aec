"""The embedded tiny Qwen2-VL: loads like Qwen2-VL-Instruct, same tokens and chat format, small, deterministic."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from PIL import Image

# Written out by hand (not imported from vlm_rl.models.tiny): Qwen2-VL's special tokens, in its vocabulary's order.
QWEN2_VL_SPECIAL_TOKENS = [
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
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_processor):
    return tiny_processor.tokenizer


def image_token_count(input_ids: torch.Tensor, tokenizer) -> int:
    return int((input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


# ---------------------------------------------------------------- loading, classes, size


def test_loads_with_the_auto_and_qwen2_vl_classes(tiny_model_dir, model):
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert type(model) is Qwen2VLForConditionalGeneration
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert type(processor.image_processor).__name__ in ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")
    assert AutoConfig.from_pretrained(tiny_model_dir).model_type == "qwen2_vl"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name


def test_parameter_count_is_tiny(model):
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 < n < 5e6, n


# ---------------------------------------------------------------- tokens and config ids


@pytest.mark.parametrize("token", QWEN2_VL_SPECIAL_TOKENS)
def test_every_qwen2_vl_special_token_is_one_token(tokenizer, token):
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (token, ids)
    assert ids[0] == tokenizer.convert_tokens_to_ids(token)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == token
    # Also inside text: never split into pieces by the BPE.
    ids = tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(token) in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_special_tokens_follow_the_bpe_vocabulary_in_qwen2_vl_order(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[-1] == len(tokenizer) - 1


def test_tokenizer_eos_pad_are_qwen2_vl_instructs(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None


def test_config_special_ids_match_the_tokenizer(model, tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    config = model.config
    text = config.get_text_config()
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert text.eos_token_id == ids["<|im_end|>"] == tokenizer.eos_token_id
    assert text.pad_token_id == ids["<|endoftext|>"] == tokenizer.pad_token_id
    assert text.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    eos = model.generation_config.eos_token_id
    assert ids["<|im_end|>"] in (eos if isinstance(eos, list) else [eos])


def test_trainer_special_token_alignment_changes_nothing(tiny_model, tiny_processor):
    """transformers' Trainer rewrites the model's eos/pad/bos ids to the tokenizer's at train(): they must agree."""
    from transformers.trainer_utils import align_special_tokens

    text = tiny_model.config.get_text_config()
    before = (text.eos_token_id, text.pad_token_id, text.bos_token_id, tiny_model.generation_config.eos_token_id)
    align_special_tokens(tiny_model, tiny_processor)
    assert (text.eos_token_id, text.pad_token_id, text.bos_token_id, tiny_model.generation_config.eos_token_id) == before


def test_mrope_sections_sum_to_half_the_head_dim(model):
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    section = text.rope_parameters["mrope_section"]
    assert len(section) == 3
    assert sum(section) == head_dim // 2


def test_byte_level_round_trip(tokenizer):
    text = "What colour is the square? Ünïcödé — 😀\n\ttabs  and  spaces 12345"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


# ---------------------------------------------------------------- chat template (expected strings by hand)


def render(processor, messages, **kwargs) -> str:
    text = processor.apply_chat_template(messages, tokenize=False, **kwargs)
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) == text
    return text


def test_template_inserts_the_default_system_prompt(tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    assert render(tiny_processor, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the square?<|im_end|>\n"
    )


def test_template_add_generation_prompt(tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert render(tiny_processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("system_content", ["Answer in one word.", [{"type": "text", "text": "Answer in one word."}]])
def test_template_keeps_a_custom_system_prompt(tiny_processor, system_content):
    messages = [{"role": "system", "content": system_content}, {"role": "user", "content": "Hi"}]
    assert render(tiny_processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_string_content(tiny_processor):
    assert render(tiny_processor, [{"role": "user", "content": "Hello there"}]) == (
        SYSTEM + "<|im_start|>user\nHello there<|im_end|>\n"
    )


def test_template_multi_turn_with_an_assistant_turn(tiny_processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "And the shape?"},
    ]
    assert render(tiny_processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_two_images_and_text_around_them(tiny_processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First: "},
                {"type": "image"},
                {"type": "text", "text": " second: "},
                {"type": "image"},
                {"type": "text", "text": " Same colour?"},
            ],
        }
    ]
    assert render(tiny_processor, messages) == (
        SYSTEM + "<|im_start|>user\nFirst: " + IMAGE + " second: " + IMAGE + " Same colour?<|im_end|>\n"
    )


# ---------------------------------------------------------------- image tokens


@pytest.mark.parametrize(
    "size, grid, n_tokens",
    [((84, 84), (1, 6, 6), 9), ((112, 84), (1, 6, 8), 12), ((84, 140), (1, 10, 6), 15), ((140, 140), (1, 10, 10), 25)],
)
def test_image_token_count_for_the_synthetic_sizes(tiny_processor, size, grid, n_tokens):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tiny_processor(text=[text], images=[Image.new("RGB", size, (200, 30, 30))], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [list(grid)]
    n = image_token_count(batch["input_ids"], tiny_processor.tokenizer)
    assert n == int(batch["image_grid_thw"].prod()) // 4 == n_tokens
    assert 4 <= n <= 36  # "tens of tokens": the whole prompt stays short on CPU
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod())


def test_large_images_are_capped_by_max_pixels(tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False)
    batch = tiny_processor(text=[text], images=[Image.new("RGB", (1000, 700))], return_tensors="pt")
    n = image_token_count(batch["input_ids"], tiny_processor.tokenizer)
    assert n == int(batch["image_grid_thw"].prod()) // 4
    assert 4 <= n <= 36


def test_max_pixels_override_caps_the_image_tokens_without_deprecated_calls(tiny_model_dir):
    import warnings

    from vlm_rl.models.loading import load_processor

    messages = [{"role": "user", "content": [{"type": "image"}]}]
    counts = []
    for max_pixels in (None, 28 * 28 * 4):
        processor = load_processor(str(tiny_model_dir), max_pixels=max_pixels)
        text = processor.apply_chat_template(messages, tokenize=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecated min_pixels/max_pixels at call time
            batch = processor(text=[text], images=[Image.new("RGB", (1000, 700))], return_tensors="pt")
        counts.append(image_token_count(batch["input_ids"], processor.tokenizer))
    assert counts[1] <= 4 < counts[0]


# ---------------------------------------------------------------- batched, left-padded generation


def sample(text: str, size: tuple[int, int], colour=(200, 30, 30)) -> dict:
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        "images": [Image.new("RGB", size, colour)],
    }


@pytest.fixture(scope="module")
def batch3(tiny_processor):
    from vlm_rl.data.prompts import encode_prompts

    samples = [
        sample("What colour?", (84, 84)),
        sample("How many squares are there? Answer with one word.", (140, 112)),
        sample("Where is the blue circle?", (112, 140), (30, 60, 220)),
    ]
    return samples, encode_prompts(tiny_processor, samples)


def test_batch_of_different_image_sizes_is_left_padded(batch3, tiny_processor):
    samples, batch = batch3
    tok = tiny_processor.tokenizer
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == batch["mm_token_type_ids"].shape and ids.shape[0] == 3
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 6], [1, 8, 10], [1, 10, 8]]
    assert batch["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    assert batch["num_images"] == [1, 1, 1]
    assert mask[:, -1].eq(1).all()  # every row ends with a real token: padding is on the left
    lengths = mask.sum(dim=1)
    assert (lengths < ids.shape[1]).any()  # different lengths, so some row is padded
    for row in range(3):
        n_pad = ids.shape[1] - int(lengths[row])
        assert mask[row, :n_pad].eq(0).all() and mask[row, n_pad:].eq(1).all()
        assert ids[row, :n_pad].eq(tok.pad_token_id).all()
        assert int(ids[row, n_pad]) == tok.convert_tokens_to_ids("<|im_start|>")
        assert image_token_count(ids[row], tok) == int(grid[row].prod()) // 4


def test_left_padding_does_not_change_a_prompts_next_token_logits(batch3, tiny_processor, model):
    """Correct left padding (masks and M-RoPE positions): each row's logits equal the row's logits alone."""
    from vlm_rl.data.prompts import encode_prompts

    samples, batch = batch3
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        together = model(**{k: batch[k] for k in keys}).logits[:, -1]
        for row, s in enumerate(samples):
            alone = encode_prompts(tiny_processor, [s])
            logits = model(**{k: alone[k] for k in keys}).logits[:, -1]
            torch.testing.assert_close(together[row], logits[0], rtol=1e-4, atol=1e-5)


def test_generate_responses_on_the_batch(batch3, tiny_processor, model):
    from vlm_rl.rollout.generation import generate_responses, make_generation_config

    _, batch = batch3
    tok = tiny_processor.tokenizer
    inputs = {k: v for k, v in batch.items() if k != "num_images"}
    config = make_generation_config(tok, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(0)
    responses = generate_responses(model, inputs, config)
    assert responses.dtype == torch.long and responses.shape[0] == 3
    assert 1 <= responses.shape[1] <= 8
    assert ((responses >= 0) & (responses < len(tok))).all()
    vision = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")]
    assert not torch.isin(responses, torch.tensor(vision)).any()
    # Greedy decoding is reproducible.
    greedy = make_generation_config(tok, max_new_tokens=4, do_sample=False)
    assert torch.equal(generate_responses(model, inputs, greedy), generate_responses(model, inputs, greedy))


def test_generate_responses_refuses_right_padding(tiny_processor, model):
    from vlm_rl.rollout.generation import generate_responses, make_generation_config

    samples = [sample("What colour?", (84, 84)), sample("How many squares are there? Answer with one word.", (84, 84))]
    texts = [tiny_processor.apply_chat_template(s["prompt"], tokenize=False, add_generation_prompt=True) for s in samples]
    batch = tiny_processor(text=texts, images=[s["images"][0] for s in samples], return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(ValueError, match="left-padded"):
        generate_responses(model, dict(batch), make_generation_config(tiny_processor.tokenizer, max_new_tokens=2))


# ---------------------------------------------------------------- determinism and speed


def file_bytes(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_model_dir, tmp_path):
    from vlm_rl.models.tiny import make_tiny_model

    a = file_bytes(make_tiny_model(tmp_path / "a", seed=0))
    b = file_bytes(make_tiny_model(tmp_path / "b", seed=0))
    assert "model.safetensors" in a and len(a) >= 6
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    assert file_bytes(tiny_model_dir) == a  # the session's model (built earlier, seed 0) too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp directories left behind


def test_different_seed_gives_different_weights_same_tokenizer(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from vlm_rl.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "seed1", seed=1)
    w0, w1 = load_file(tiny_model_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert w0.keys() == w1.keys()
    matrices = [k for k in w0 if w0[k].dim() >= 2]  # norms (ones) and biases (zeros) do not depend on the seed
    assert len(matrices) > 20
    assert [k for k in matrices if torch.equal(w0[k], w1[k])] == []
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_make_tiny_model_does_not_touch_the_global_rng(tmp_path):
    from vlm_rl.models.tiny import make_tiny_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_make_tiny_model_is_fast(tmp_path):
    from vlm_rl.models.tiny import make_tiny_model

    start = time.perf_counter()
    make_tiny_model(tmp_path / "m", seed=2)
    assert time.perf_counter() - start < 60


def test_resolve_model_path_builds_tiny_once(tmp_path, monkeypatch):
    from vlm_rl.models.tiny import resolve_model_path

    monkeypatch.setenv("VLM_RL_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path("tiny")
    assert path.startswith(str(tmp_path / "cache"))
    config = Path(path) / "config.json"
    mtime = config.stat().st_mtime_ns
    assert resolve_model_path("tiny") == path
    assert config.stat().st_mtime_ns == mtime  # not rebuilt
    assert resolve_model_path("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"
    assert resolve_model_path(str(tmp_path / "my-model")) == str(tmp_path / "my-model")
