"""Every model family (vlm_rl.models.families) runs the same pipeline: its tiny model loads with the Auto classes, the
pitfall tests of test_logprobs/test_generation/test_integrity/test_vision_reuse hold for it, PPO with the value
head trains it and its checkpoints load, and a learned reward model on its backbone scores."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import test_generation as generation_tests
import test_integrity as integrity_tests
import test_logprobs as logprob_tests
import test_prefix as prefix_tests
import test_rollout as rollout_tests
import test_vision_reuse as reuse_tests
from trainer_helpers import completion_length, make_trainer, parameters
from vlm_rl.data.formats import load_samples
from vlm_rl.errors import UserError
from vlm_rl.models.families import FAMILIES, family_of, get_family
from vlm_rl.rollout.generation import eos_token_ids, generate_responses, make_generation_config, pad_token_id
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.models.loading import language_model_lora_config, load_processor
from vlm_rl.rollout.batch import Rollout
from vlm_rl.data.prompts import encode_prompts, model_inputs
from vlm_rl.models.tiny import make_tiny_model
from vlm_rl.models.vision_features import tower_trains
from vlm_rl.models.critic import Critic, PolicyAndValue
from vlm_rl.models.value_head import ValueHead

NAMES = list(FAMILIES)
CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
}
pytestmark = pytest.mark.parametrize("family", NAMES)


@pytest.fixture()
def model_dir(family, family_dirs):
    return family_dirs(family)


@pytest.fixture()
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture()
def model(model_dir):
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return list(load_samples(synthetic_data_dir / "train.jsonl"))


def test_tiny_model_loads_with_the_auto_classes(family, model, processor, model_dir, tmp_path):
    model_class, processor_class = CLASSES[family]
    assert type(model).__name__ == model_class and type(processor).__name__ == processor_class
    assert family_of(model) is get_family(family) and family_of(model.config) is get_family(family)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == get_family(family).model_type
    tower = get_family(family).vision_tower(model)
    assert tower is getattr(model.model, get_family(family).vision_module)
    again = make_tiny_model(tmp_path / "again", seed=0, family=family)
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()  # same seed, same bytes


def test_unknown_family_is_a_user_error(family, tmp_path):
    with pytest.raises(UserError, match="unknown model family 'no_such'.*qwen2_vl"):
        make_tiny_model(tmp_path / "x", family="no_such")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="model type 'bert' is not a supported VLM family"):
        family_of("bert")


def test_logprobs_match_the_sampling_distribution(family, model, processor, samples):
    logprob_tests.test_logprobs_match_the_sampling_distribution(model, processor, samples)


def test_group_prefill_gives_the_per_row_greedy_tokens(family, model, processor, samples):
    prefix_tests.test_greedy_group_prefill_gives_the_per_row_tokens(model, processor, samples)


def test_group_prefill_samples_what_a_forward_recomputes(family, model, processor, samples):
    prefix_tests.test_sampled_group_tokens_have_the_logprobs_a_forward_recomputes(model, processor, samples)


def test_shared_prompt_forward_gives_the_full_forwards_numbers(family, model, processor, samples):
    prefix_tests.test_shared_prompt_forward_gives_the_full_forwards_numbers_and_gradients(model, processor, samples)


def test_sample_is_padding_invariant(family, model, processor, samples):
    head = ValueHead(model.config.text_config.hidden_size)
    torch.nn.init.normal_(head.summary.weight, std=0.5)  # as test_logprobs' policy_and_value fixture
    policy_and_value = PolicyAndValue(model, Critic(head))
    logprob_tests.test_sample_is_padding_invariant(policy_and_value, model, processor, samples)


def test_positions_after_generate_equal_a_fresh_models(family, model_dir, model, processor, samples):
    if not get_family(family).mrope:
        pytest.skip("LLaVA's positions are 1-D, counted from the attention mask: generate caches no rope_deltas that "
                    "could leak (test_forward_positions_are_the_ones_generate_used checks its positions)")
    logprob_tests.test_rope_deltas_from_generate_do_not_leak(model_dir, model, processor, samples)


def language_model_positions(model, run) -> list[torch.Tensor]:
    """The `position_ids` the language model receives during `run()`, one tensor per call."""
    seen = []
    language_model = getattr(model.model, family_of(model).language_model_module)
    hook = language_model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_forward_positions_are_the_ones_generate_used(family, model, processor, samples):
    query = encode_prompts(processor, samples[:4])
    assert (query["attention_mask"] == 0).any()  # prompts of several lengths: some rows are left-padded
    inputs = model_inputs(query)
    tok = processor.tokenizer
    torch.manual_seed(0)
    out = []
    steps = language_model_positions(model, lambda: out.append(generate_responses(model, inputs, make_generation_config(tok, max_new_tokens=4))))
    rollout = Rollout.from_generation(query, out[0], eos_token_ids(tok), pad_token_id(tok), ["s"] * 4, family_of(model))
    with torch.no_grad():
        (forward,) = language_model_positions(model, lambda: response_logprobs(model, rollout, 1.0))  # (..., B, T_q + T_r)
    generated = torch.cat(steps, dim=-1)  # (..., B, T_q + T_r - 1): the prompt's, then one per sampled token
    if generated.dim() == 3:  # M-RoPE: generate prepends a row of text positions that only builds the attention mask
        generated = generated[-forward.shape[0] :]
    real = rollout.attention_mask[:, : generated.shape[-1]].bool()  # (B, T_q + T_r - 1); padding has no position
    assert torch.equal(generated[..., real], forward[..., : generated.shape[-1]][..., real])


def test_lm_head_sees_only_response_positions(family, model, processor, samples):
    logprob_tests.test_lm_head_sees_only_response_positions(model, processor, samples)


def test_vision_tokens_are_never_sampled(family, model, processor, samples):
    tok = processor.tokenizer
    suppressed = make_generation_config(tok, max_new_tokens=1).suppress_tokens
    spec = get_family(family)
    assert {tok.convert_tokens_to_ids(t) for t in (spec.image_token, *spec.vision_tokens)} <= set(suppressed)  # its own too
    prompts = model_inputs(encode_prompts(processor, samples[:4]))
    generation_tests.test_vision_tokens_are_never_sampled(model, processor, prompts)


def test_integrity_checks_catch_a_dropped_image(family, model, processor, samples):
    query = encode_prompts(processor, samples[:3])
    batch = (query, [s["_source"] for s in samples[:3]])
    integrity_tests.test_consistent_batch_passes(model, batch)
    integrity_tests.test_dropped_pixel_values_are_caught(model, batch)
    integrity_tests.test_image_token_mismatch_names_the_sample(model, processor, batch)
    integrity_tests.test_forward_runs_the_check(model, processor, batch)


def test_select_keeps_each_samples_images(family, processor, samples):
    rollout_tests.test_select_keeps_each_samples_patches(samples, processor, get_family(family))


def test_among_several_processes_a_forward_without_images_runs_the_tower_on_a_dummy(family, model, processor, samples, monkeypatch):
    """Under ZeRO-3/FSDP2 a vision tower's forward gathers its shards on every rank: with several processes, a forward
    or generate without images whose model encodes pixels runs the tower once on a dummy image (where the real one
    would), changing no number; the tower's parameters get zero gradients, as a rank with images gives them real
    ones. Where the forwards read encoded features no rank runs the tower, and encoding no image runs it once."""
    import torch.distributed as dist

    from vlm_rl.models.vision_features import encode_images, vision_encoder

    batch = [rollout_tests.text_only(s) for s in samples[:2]]
    rollout = logprob_tests.rollout_for(model, processor, batch)
    model.requires_grad_(True)  # the tower trains: it must take part in the backward too
    alone, _ = response_logprobs(model, rollout, 1.0)
    with reuse_tests.tower_calls(model) as calls:
        response_logprobs(model, rollout, 1.0)
    assert calls == [0]  # one process: nothing to keep in step
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with reuse_tests.tower_calls(model) as calls:
        among, _ = response_logprobs(model, rollout, 1.0)
    assert calls == [1] and torch.equal(among, alone)
    among.sum().backward()
    dummy = {n: p.grad for module in vision_encoder(model) for n, p in module.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    response_logprobs(model, logprob_tests.rollout_for(model, processor, samples[:2]), 1.0)[0].sum().backward()
    real = {n for module in vision_encoder(model) for n, p in module.named_parameters() if p.grad is not None}
    assert dummy.keys() == real and real and not any(g.any() for g in dummy.values())  # the same parameters, zeros

    query = encode_prompts(processor, batch)
    inputs = {k: v for k, v in query.items() if k != "num_images"}
    config = make_generation_config(processor.tokenizer, max_new_tokens=3)
    with torch.no_grad(), reuse_tests.tower_calls(model) as calls:
        features = encode_images(model, None, device=torch.device("cpu"))  # a rank with no image; another encodes its own
        assert features.per_image == () and calls == [1]
        generate_responses(model, inputs, config, image_features=features, seed=0)  # the features: no tower
        assert calls == [1]
        generate_responses(model, inputs, config, seed=0)  # pixels elsewhere: the tower once (the prefill)
        assert calls == [2]


def test_lora_adapts_the_language_model_only(family, model):
    from peft import get_peft_model

    spec = get_family(family)
    adapted = get_peft_model(model, language_model_lora_config(4, 8, 0.0, None, spec))  # the family's default targets
    lora = [n for n, _ in adapted.named_parameters() if ".lora_A." in n]
    layers = model.config.text_config.num_hidden_layers
    assert len(lora) == layers * len(spec.lora_target_modules)  # every target of every language-model layer ...
    assert all(f".{spec.language_model_module}." in n for n in lora)
    assert not tower_trains(adapted)  # ... and nothing in the vision encoder (tower, projector)


def test_min_max_pixels_apply_only_where_images_resize(family, model_dir):
    if get_family(family).image_layout.resizable:
        assert load_processor(str(model_dir), max_pixels=28 * 28 * 9).image_processor.size["longest_edge"] == 28 * 28 * 9
    else:  # LLaVA: every image is resized to the tower's input size
        with pytest.raises(UserError, match="fixed input size.*leave min_pixels and max_pixels unset"):
            load_processor(str(model_dir), max_pixels=28 * 28 * 9)


def test_reward_pairs_collate_the_same_from_the_cache(family, processor, synthetic_data_dir):
    from reward_models.train_reward import PairCollator, load_pairs

    pairs = [load_pairs(synthetic_data_dir / "preferences.jsonl", "train")[0][i] for i in range(3)]
    fresh, cached = (PairCollator(processor, get_family(family), "right", None, cache=c) for c in (False, True))
    cached(pairs[1:])  # fills the cache in another batch
    a, b = fresh(pairs), cached(pairs)
    assert a.keys() == b.keys() and a["num_images"] == b["num_images"] == [1] * 6
    for key in a:  # exact: token ids, masks and pixels the processor prepares per image (no GEMM)
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_vision_feature_reuse_is_exact(family, model_dir, synthetic_data_dir, tmp_path):
    reuse_tests.test_full_finetuning_reuse_is_exact_and_encodes_once(tmp_path, model_dir, synthetic_data_dir)


def test_ppo_with_the_value_head_trains_and_checkpoints_load(family, model_dir, synthetic_data_dir, tmp_path):
    trainer = make_trainer(tmp_path, model_dir, synthetic_data_dir, reward=[completion_length], save_steps=1, total_episodes=8)
    assert trainer.model.value_head is not None
    before = parameters(trainer.model.policy)
    trainer.train()
    after = parameters(trainer.model.policy)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the policy moved
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "value_head.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert family_of(loaded) is get_family(family)
    assert type(AutoProcessor.from_pretrained(checkpoint)).__name__ == CLASSES[family][1]
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "run")
    saved = dict(final.named_parameters())
    assert all(torch.equal(saved[n], p) for n, p in trainer.model.policy.named_parameters())


def test_learned_reward_model_scores(family, model_dir, samples, tmp_path):
    from reward_models.vlm_reward import VLMRewardModel

    rm = VLMRewardModel.from_base(str(model_dir))
    assert family_of(rm.base_backbone) is get_family(family)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    batch = samples[:3]
    kwargs = dict(images=[s["images"] for s in batch])
    scores = rm([s["prompt"] for s in batch], ["a red square", "blue", "two"], **kwargs)
    assert len(scores) == 3 and all(torch.isfinite(torch.tensor(scores))) and len(set(scores)) == 3
    rm.save_pretrained(tmp_path / "rm")
    again = VLMRewardModel.from_pretrained(tmp_path / "rm", device="cpu")
    assert type(again.base_backbone) is type(rm.base_backbone)
    assert torch.allclose(torch.tensor(again([s["prompt"] for s in batch], ["a red square", "blue", "two"], **kwargs)), torch.tensor(scores), atol=1e-5)


def test_sft_ppo_compare_end_to_end(family, tmp_path):
    from vlm_rl.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=str(tmp_path / "demo"), family=family, n=24, sft_steps=2, sft_batch_size=4, ppo_episodes=16, ppo_batch_size=8,
        ppo_mini_batches=1, ppo_epochs=1, compare_samples=4,
    )
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == get_family(family).model_type
    for stage in ("sft", "ppo"):  # each stage's output is a model of the family
        assert family_of(AutoModelForImageTextToText.from_pretrained(out / stage)) is get_family(family)
    assert (out / "ppo" / "value_head.safetensors").exists()
    assert set(summary["models"]) == {"sft", "rl"} and summary["models"]["rl"]["n"] == 4
