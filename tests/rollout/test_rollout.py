"""The Rollout batch: joining query|response, and micro-batch selection that keeps each sample's images."""

import pytest
import torch

from vlm_rl.data.formats import load_samples
from vlm_rl.models.families import get_family
from vlm_rl.rollout.batch import Rollout
from vlm_rl.data.prompts import PromptTooLongError, encode_prompts

QWEN2_VL = get_family("qwen2_vl")  # the family of conftest's tiny model


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return list(load_samples(synthetic_data_dir / "train.jsonl"))[:5]


def text_only(sample):
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}]
    return {**sample, "prompt": prompt, "images": [], "_source": "text-only"}


def test_select_keeps_each_samples_patches(samples, tiny_processor, family=QWEN2_VL):
    batch = [samples[0], text_only(samples[1]), samples[2], samples[3]]
    query = encode_prompts(tiny_processor, batch)
    assert query["num_images"] == [1, 0, 1, 1]
    sizes = {s["images"][0].size for s in (samples[0], samples[2], samples[3])}
    responses = torch.randint(10, 100, (4, 3))
    rollout = Rollout.from_generation(query, responses, [1], 0, [s["_source"] for s in batch], family)
    picked = rollout.select([3, 1, 0])
    alone = [encode_prompts(tiny_processor, [b]) for b in (batch[3], batch[0])]
    for key in family.image_layout.keys:  # pixel_values, and the Qwen families' image_grid_thw
        # exact: selection copies tensors, and the processor prepares each image on its own (no GEMM)
        assert torch.equal(getattr(picked, key), torch.cat([a[key] for a in alone])), key
    assert picked.num_images == [1, 0, 1]
    assert picked.sources == [batch[3]["_source"], "text-only", batch[0]["_source"]]
    assert torch.equal(picked.query_response, rollout.query_response[[3, 1, 0]])
    assert len(sizes) > 1  # images of different sizes, so a wrong split would misalign patches
    assert picked.context_length == rollout.context_length
    only_text = rollout.select([1])
    positions = family.position_inputs(only_text.attention_mask, only_text.mm_token_type_ids, {})
    assert only_text.model_inputs().keys() == {"input_ids", "attention_mask", *positions}


def test_query_response_layout(samples, tiny_processor):
    query = encode_prompts(tiny_processor, samples[:2])
    responses = torch.tensor([[30, 31, 1, 5], [30, 31, 32, 33]])
    rollout = Rollout.from_generation(query, responses, eos_ids=[1], pad_id=5, sources=["a", "b"], family=QWEN2_VL)
    t_q = query["input_ids"].shape[1]
    assert rollout.context_length == t_q
    assert rollout.query_response.shape == (2, t_q + 4)
    assert rollout.responses.tolist() == [[30, 31, 1, 5], [30, 31, 32, 33]]
    assert rollout.response_lengths.tolist() == [3, 4]
    assert rollout.has_eos.tolist() == [True, False]
    assert rollout.attention_mask[:, t_q:].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert (rollout.mm_token_type_ids[:, t_q:] == 0).all()


def test_overlong_prompt_is_an_error_naming_the_sample(samples, tiny_processor):
    lengths = encode_prompts(tiny_processor, samples[:2])["attention_mask"].sum(1).tolist()
    limit = min(lengths) - 1
    with pytest.raises(PromptTooLongError) as err:
        encode_prompts(tiny_processor, samples[:2], max_prompt_length=limit)
    message = str(err.value)
    assert f"{samples[0]['_source']} ({lengths[0]} tokens)" in message
    assert f"max_prompt_length={limit}" in message and "skip_long_prompts" in message
