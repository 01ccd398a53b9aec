"""Every forward that should see the images is checked, and a violation names the sample."""

import pytest
import torch

from vlm_rl.data.formats import load_samples
from vlm_rl.models.families import family_of
from vlm_rl.rollout.integrity import MultimodalIntegrityError, check_model_inputs
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.rollout.batch import Rollout
from vlm_rl.data.prompts import encode_prompts


@pytest.fixture(scope="module")
def batch(synthetic_data_dir, tiny_processor):
    samples = list(load_samples(synthetic_data_dir / "train.jsonl"))[:3]
    query = encode_prompts(tiny_processor, samples)
    return query, [s["_source"] for s in samples]


def inputs_of(query):
    return {k: v for k, v in query.items() if k != "num_images"}


def test_consistent_batch_passes(tiny_model, batch):
    query, names = batch
    check_model_inputs(tiny_model, inputs_of(query), query["num_images"], names, "test")


def test_dropped_pixel_values_are_caught(tiny_model, batch):
    query, names = batch
    layout = family_of(tiny_model).image_layout  # Qwen: image_grid_thw; LLaVA (test_families.py): pixel_values
    inputs = {k: v for k, v in inputs_of(query).items() if k not in layout.keys}
    with pytest.raises(MultimodalIntegrityError, match=f"{layout.counted_by} has 0 rows but the samples hold 3 images"):
        check_model_inputs(tiny_model, inputs, query["num_images"], names, "reward forward")


def test_patches_split_wrongly_are_caught(tiny_model, batch):
    query, names = batch
    inputs = dict(inputs_of(query), pixel_values=query["pixel_values"][:-4])
    with pytest.raises(MultimodalIntegrityError, match="pixel_values has"):
        check_model_inputs(tiny_model, inputs, query["num_images"], names, "old-policy forward")


def test_image_token_mismatch_names_the_sample(tiny_model, tiny_processor, batch):
    query, names = batch
    input_ids = query["input_ids"].clone()
    image_token = tiny_processor.tokenizer.convert_tokens_to_ids(family_of(tiny_model).image_token)
    first = (input_ids[1] == image_token).nonzero()[0, 0]
    input_ids[1, first] = tiny_processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(MultimodalIntegrityError, match=f"sample {names[1]} has"):
        check_model_inputs(tiny_model, dict(inputs_of(query), input_ids=input_ids), query["num_images"], names, "x")


def test_image_counts_out_of_step_are_caught(tiny_model, batch):
    query, names = batch
    with pytest.raises(MultimodalIntegrityError, match=names[0]):
        check_model_inputs(tiny_model, inputs_of(query), [2, 0, 1], names, "x")


def test_forward_runs_the_check(tiny_model, tiny_processor, batch):
    query, names = batch
    responses = torch.full((3, 2), 20)
    rollout = Rollout.from_generation(query, responses, [1], 0, names, family_of(tiny_model))
    broken = Rollout(**{**rollout.__dict__, "pixel_values": None, "image_grid_thw": None})
    with pytest.raises(MultimodalIntegrityError, match="reference forward"):
        response_logprobs(tiny_model, broken, 1.0, where="reference forward")


def drop_first_image_token(processor, inputs: dict, row: int) -> dict:
    """`inputs` with one `<|image_pad|>` of `row` turned into text: its image tokens no longer match its pixels."""
    input_ids = inputs["input_ids"].clone()
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    input_ids[row, (input_ids[row] == image_pad).nonzero()[0, 0]] = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {**inputs, "input_ids": input_ids}


def test_rollout_generate_runs_the_check(tmp_path, tiny_model_dir, synthetic_data_dir, tiny_processor, monkeypatch):
    from trainer_helpers import make_trainer

    from vlm_rl.training import rollout_stage

    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir)
    samples = trainer.batch_samples(0)
    real_encode = rollout_stage.encode_prompts
    monkeypatch.setattr(rollout_stage, "encode_prompts", lambda *a, **k: drop_first_image_token(tiny_processor, real_encode(*a, **k), 1))
    with pytest.raises(MultimodalIntegrityError, match=f"rollout generate.*sample {samples[1]['_source']}|sample {samples[1]['_source']}.*rollout generate"):
        trainer.make_rollout(samples)


def test_learned_reward_model_runs_the_check(tiny_model_dir, tiny_processor, batch, synthetic_data_dir, monkeypatch):
    from reward_models.vlm_reward import VLMRewardModel

    samples = list(load_samples(synthetic_data_dir / "train.jsonl"))[:3]
    rm = VLMRewardModel.from_base(str(tiny_model_dir))
    real_encode = rm.encode
    monkeypatch.setattr(rm, "encode", lambda *a, **k: drop_first_image_token(tiny_processor, real_encode(*a, **k), 2))
    with pytest.raises(MultimodalIntegrityError, match=f"reward model.*sample {samples[2]['_source']}|sample {samples[2]['_source']}.*reward model"):
        rm.score([s["prompt"] for s in samples], ["a", "b", "c"], images=[s["images"] for s in samples], _source=[s["_source"] for s in samples])
