"""The explicit generation config: stops at eos, ignores the checkpoint's near-greedy defaults, never samples vision tokens."""

import pytest
import torch
from transformers import GenerationConfig

from vlm_rl.data.formats import load_samples
from vlm_rl.models.families import QWEN_VISION_TOKENS
from vlm_rl.rollout.generation import (
    eos_token_ids,
    first_eos_mask,
    generate_responses,
    make_generation_config,
    pad_token_id,
    vision_token_ids,
)
from vlm_rl.data.prompts import encode_prompts, model_inputs


@pytest.fixture(scope="module")
def prompts(synthetic_data_dir, tiny_processor):
    samples = load_samples(synthetic_data_dir / "train.jsonl")[:4]
    batch = encode_prompts(tiny_processor, samples)
    return model_inputs(batch)


def add_logit_bias(model, token_ids, bias):
    """Make `token_ids` overwhelmingly likely at every step, via a hook on the LM head."""

    def hook(module, inputs, output):
        output[..., token_ids] += bias
        return output

    return model.lm_head.register_forward_hook(hook)


def test_config_reads_ids_from_tokenizer(tiny_processor):
    tok = tiny_processor.tokenizer
    config = make_generation_config(tok, max_new_tokens=7, temperature=0.7)
    assert config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert config.pad_token_id in config.eos_token_id  # pad == eos: masks must come from positions
    assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.max_new_tokens) == (True, 0.7, 0, 1.0, 7)
    assert sorted(config.suppress_tokens) == sorted(tok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS)


def test_bad_settings_are_rejected(tiny_processor):
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_generation_config(tiny_processor.tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        make_generation_config(tiny_processor.tokenizer, max_new_tokens=4, temperature=0.0)


def test_checkpoint_generation_config_does_not_leak(tiny_model, tiny_processor, prompts):
    # Qwen2-VL-Instruct ships these near-greedy values; our rollouts must still explore. transformers merges a
    # model's generation_config into the fields an explicit config leaves unset (None), such as min_p: only the
    # swap keeps that one out.
    tiny_model.generation_config = GenerationConfig(temperature=0.01, top_k=1, top_p=0.001, min_p=0.99, do_sample=True, max_new_tokens=2)
    config = make_generation_config(tiny_processor.tokenizer, max_new_tokens=6, temperature=1.0)
    one = {k: v[:1].repeat(8, *[1] * (v.dim() - 1)) if k != "pixel_values" else v for k, v in prompts.items()}
    n_patches = int(prompts["image_grid_thw"][0].prod())
    one["pixel_values"] = prompts["pixel_values"][:n_patches].repeat(8, 1)
    one["image_grid_thw"] = prompts["image_grid_thw"][:1].repeat(8, 1)
    torch.manual_seed(0)
    responses = generate_responses(tiny_model, one, config)
    assert responses.shape == (8, 6)  # max_new_tokens came from our config, not the checkpoint's 2
    assert len({tuple(r.tolist()) for r in responses}) > 1  # sampled, not greedy
    assert tiny_model.generation_config.top_k == 1  # the model's own config is restored afterwards


def test_vision_tokens_are_never_sampled(tiny_model, tiny_processor, prompts):
    tok = tiny_processor.tokenizer
    vision_ids = vision_token_ids(tok)
    handle = add_logit_bias(tiny_model, vision_ids, 50.0)
    try:
        torch.manual_seed(0)
        naive = tiny_model.generate(**prompts, max_new_tokens=5, do_sample=True, pad_token_id=pad_token_id(tok))
        assert torch.isin(naive[:, prompts["input_ids"].shape[1] :], torch.tensor(vision_ids)).any()  # the hazard is real
        ours = generate_responses(tiny_model, prompts, make_generation_config(tok, max_new_tokens=5))
        assert not torch.isin(ours, torch.tensor(vision_ids)).any()
    finally:
        handle.remove()


def test_decoding_stops_at_eos(tiny_model, tiny_processor, prompts):
    tok = tiny_processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    handle = add_logit_bias(tiny_model, [im_end], 50.0)
    try:
        responses = generate_responses(tiny_model, prompts, make_generation_config(tok, max_new_tokens=20))
    finally:
        handle.remove()
    assert responses.shape[1] == 1  # every row ended at once: generation stopped instead of running to 20
    assert (responses[:, 0] == im_end).all()


def test_left_padding_is_required(tiny_model, tiny_processor, prompts):
    right_padded = dict(prompts, attention_mask=prompts["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left-padded"):
        generate_responses(tiny_model, right_padded, make_generation_config(tiny_processor.tokenizer, max_new_tokens=2))


def test_first_eos_mask_by_position_when_pad_is_eos(tiny_processor):
    tok = tiny_processor.tokenizer
    eos = eos_token_ids(tok)
    im_end, pad = eos[0], pad_token_id(tok)
    a, b = 10, 11
    responses = torch.tensor(
        [
            [a, b, im_end, pad, pad],  # ends with <|im_end|>, then pad
            [a, pad, pad, pad, pad],  # ends with <|endoftext|>, which is also the pad id
            [a, b, a, b, a],  # no eos: the whole row is response
            [im_end, a, b, im_end, a],  # only the first eos counts
        ]
    )
    mask, has_eos = first_eos_mask(responses, eos)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ]
    assert has_eos.tolist() == [True, True, False, True]


def test_a_seeded_generate_samples_from_its_seed_and_leaves_the_global_stream_alone(tiny_model, tiny_processor, prompts):
    # A rank that has finished keeps sampling until all have (synced_gpus): were it drawing from the global stream,
    # every later draw would depend on how long the other ranks decoded.
    tok = tiny_processor.tokenizer
    tokens = []
    for global_seed, max_new_tokens in ((0, 2), (1, 8)):
        torch.manual_seed(global_seed)
        tokens.append(generate_responses(tiny_model, prompts, make_generation_config(tok, max_new_tokens=max_new_tokens), seed=123))
        after = torch.rand(4)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(4))  # not one draw taken from the global stream
    assert torch.equal(tokens[1][:, :2], tokens[0])  # the same seed, the same samples, whatever the global stream
    other = generate_responses(tiny_model, prompts, make_generation_config(tok, max_new_tokens=8), seed=124)
    assert not torch.equal(other, tokens[1])
