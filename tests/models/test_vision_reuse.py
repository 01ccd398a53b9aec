"""Each rollout image through the vision tower once (vlm_rl/models/vision_features.py): exact where reused, off elsewhere.

Every exactness test runs one whole PPO iteration twice from the same seed, with `reuse_vision_features` on and
off, and compares sampled tokens, old-policy/reference logprobs, values, entropies, scores and gradients, while
counting the calls of each vision tower (the reuse really happened: one encoding per rollout).

Exact or tolerance: the sampled tokens are compared exactly (both ways `generate` encodes the whole batch's images
in one call: the same kernels on the same shapes). Everything after is compared to float rounding
(`assert_equal_to_rounding`): with reuse the tower ran once over all the rollout's images, without it over each
micro-batch's images, so its GEMMs have other row counts, and a BLAS that blocks by shape (MKL on Intel CPUs)
rounds them differently (2e-8 absolute in a gradient was seen on a Xeon; on the AMD EPYC this was written on,
bit-identical). The same computation with other rounding, not another computation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from PIL import Image

from reward_models.vlm_reward import VLMRewardModel
from trainer_helpers import completion_length, make_config, make_sft_adapter, make_trainer, start
from vlm_rl.models.families import family_of
from vlm_rl.rollout.integrity import MultimodalIntegrityError
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.models.loading import load_policy_and_reference, load_processor
from vlm_rl.data.formats import load_samples
from vlm_rl.data.prompts import encode_prompts
from vlm_rl.training.trainer import PPOTrainer
from reward_models.registry import load_rewards
from vlm_rl.models.vision_features import FeatureLookup, encode_images, plan_sharing, vision_tower

SCORED = ("logprobs", "ref_logprobs", "values", "entropy", "scores")
# Micro-batches everywhere: scoring in 3s (uneven), training in micro-batches of 2 within mini-batches of 4, 2 epochs.
MICRO = dict(local_rollout_forward_batch_size=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=2)


@contextmanager
def tower_calls(*models):
    """A list that counts, per model, how often its vision tower runs while the context is open."""
    counts = [0] * len(models)
    hooks = []
    for i, model in enumerate(models):
        def hook(*_, i=i):
            counts[i] += 1

        hooks.append(vision_tower(model).register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def with_value_head(trainer: PPOTrainer) -> PPOTrainer:
    """Random (seeded) value-head weights, so that values are not all zero; then the model prepared."""
    with torch.no_grad():
        trainer.model.value_head.summary.weight.copy_(torch.randn(trainer.model.value_head.summary.weight.shape, generator=torch.Generator().manual_seed(1)))
    start(trainer)
    return trainer


def iteration(trainer: PPOTrainer, samples: list[dict] | None = None, seed: int = 0) -> tuple:
    """One PPO iteration by hand from a fixed seed: (rollout, old, gradients of every optimiser step)."""
    torch.manual_seed(seed)
    samples = samples if samples is not None else trainer.batch_samples(0)
    rollout = trainer.make_rollout(samples)
    scored = trainer.score(rollout, samples)
    old = {**scored, **trainer.advantages(rollout, scored)}
    steps = []
    original = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        steps.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return original(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.optimise(rollout, old)
    trainer.optimizer.step = original
    return rollout, old, steps


def assert_equal_to_rounding(a: torch.Tensor, b: torch.Tensor, name: str, of_largest: float = 1e-5) -> None:
    """`a` and `b` are one computation whose GEMMs ran on other batch layouts: equal to `of_largest` x `a`'s largest
    entry (1e-5 for features, logprobs, values, entropies; 1e-4 for gradients).

    Measured on the tiny model (test_several_images_per_sample_and_a_sample_without_image): noise of 2e-6 relative
    (rounding x 20) on the tower's output in every call but generate's moved logprobs, values and entropies by at
    most 4e-7 of their largest entry and gradients by 8e-6 (Adam's first step divides each gradient by its own
    magnitude, which amplifies rounding in the tiny ones, and the later steps start from those weights); features
    1% off moved logprobs by 2e-5 and values by 4e-4, another image's by far more."""
    torch.testing.assert_close(a, b, rtol=0, atol=of_largest * float(a.abs().max()), msg=lambda m: f"{name}: {m}")


def assert_same_iteration(a: tuple, b: tuple) -> None:
    (ra, oa, ga), (rb, ob, gb) = a, b
    assert torch.equal(ra.query_response, rb.query_response)  # sampled tokens: the same encoding both ways
    for key in SCORED:
        assert_equal_to_rounding(oa[key], ob[key], key)
    assert len(ga) == len(gb) > 0
    for step_a, step_b in zip(ga, gb):
        assert step_a.keys() == step_b.keys()
        for name in step_a:
            assert_equal_to_rounding(step_a[name], step_b[name], name, of_largest=1e-4)


def twins(tmp_path, model_dir, data_dir, **overrides) -> tuple[PPOTrainer, PPOTrainer]:
    on = make_trainer(tmp_path / "on", model_dir, data_dir, reuse_vision_features=True, **overrides)
    off = make_trainer(tmp_path / "off", model_dir, data_dir, reuse_vision_features=False, **overrides)
    return with_value_head(on), with_value_head(off)


def models_of(trainer: PPOTrainer) -> list:
    return [trainer.model.policy] + ([trainer.ref_model] if trainer.ref_model is not None else [])


def test_full_finetuning_reuse_is_exact_and_encodes_once(tmp_path, tiny_model_dir, synthetic_data_dir):
    on, off = twins(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **MICRO)
    assert on.sharing.enabled and on.sharing.reference and not off.sharing.enabled
    assert "reference" in on.sharing.describe() and "reuse_vision_features is off" in off.sharing.describe()
    with tower_calls(*models_of(on)) as calls_on:
        reused = iteration(on)
    with tower_calls(*models_of(off)) as calls_off:
        encoded = iteration(off)
    assert calls_on == [1, 0]  # once per rollout, by the policy; the reference copy never runs its tower
    # without reuse: generate + 3 scoring micro-batches + 2 epochs x 4 training micro-batches; the reference 3 times
    assert calls_off == [1 + 3 + 8, 3]
    assert reused[0].image_features is not None and encoded[0].image_features is None
    assert_same_iteration(reused, encoded)


def test_lora_reuse_is_exact_with_the_adapters_disabled_reference(tmp_path, tiny_model_dir, synthetic_data_dir):
    lora = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2)
    on, off = twins(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **MICRO, **lora)
    assert on.ref_model is None and on.sharing.reference
    for trainer in (on, off):  # the same adapters on both, which change the policy (policy and reference differ)
        with torch.no_grad():
            for name, p in trainer.model.policy.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    with tower_calls(on.model.policy) as calls:
        reused = iteration(on)
    assert calls == [1]
    mask = reused[0].response_mask
    assert (reused[1]["logprobs"] - reused[1]["ref_logprobs"])[mask].abs().max() > 1e-3  # two different models
    assert_same_iteration(reused, iteration(off))


def test_continued_adapter_reference_copy_shares_the_features(tmp_path, tiny_model_dir, synthetic_data_dir):
    adapter = make_sft_adapter(tiny_model_dir, tmp_path / "sft-adapter")
    on, off = twins(tmp_path, adapter, synthetic_data_dir, reward=[completion_length], lora_dropout=0.0, **MICRO)
    assert on.ref_model is not None and on.sharing.reference  # a frozen copy: another module, equal vision weights
    assert vision_tower(on.ref_model) is not vision_tower(on.model.policy)
    with tower_calls(*models_of(on)) as calls:
        reused = iteration(on)
    assert calls == [1, 0]
    assert_same_iteration(reused, iteration(off))


def test_several_images_per_sample_and_a_sample_without_image(tmp_path, tiny_model_dir, synthetic_data_dir):
    rows = list(load_samples(synthetic_data_dir / "train.jsonl"))[:8]
    small = Image.new("RGB", (56, 84), (200, 30, 30))

    def sample(i: int, images: list) -> dict:
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": f"How many pictures? ({i})"}]
        return {"prompt": [{"role": "user", "content": content}], "images": images, "_source": f"made:{i}"}

    samples = [
        sample(0, [rows[0]["images"][0], rows[1]["images"][0]]),  # two images
        sample(1, []),  # text only
        sample(2, [small]),
        sample(3, [rows[2]["images"][0], small, rows[3]["images"][0]]),  # three, of different sizes
        sample(4, []),
        sample(5, [rows[4]["images"][0]]),
        sample(6, [small, rows[5]["images"][0]]),
        sample(7, [rows[6]["images"][0]]),
    ]
    on, off = twins(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **MICRO)
    with tower_calls(*models_of(on)) as calls:
        reused = iteration(on, samples)
    assert calls == [1, 0]
    assert len(reused[0].image_features.per_image) == 10
    assert_same_iteration(reused, iteration(off, samples))
    # a micro-batch of text-only samples has neither pixels nor features; one with images gets its own
    assert "mm_encoder_outputs" not in reused[0].select([1, 4]).model_inputs(on.model.policy)
    picked = reused[0].select([3, 0])
    assert [f.shape[0] for f in picked.image_features.per_image] == (picked.image_grid_thw.prod(-1) // 4).tolist()


def test_select_carries_each_rows_own_features(tiny_model, tiny_processor, synthetic_data_dir):
    from vlm_rl.rollout.batch import Rollout

    samples = list(load_samples(synthetic_data_dir / "train.jsonl"))[:4]
    frozen_tower(tiny_model)
    query = encode_prompts(tiny_processor, samples)
    features = encode_images(tiny_model, query["pixel_values"], query["image_grid_thw"])
    rollout = Rollout.from_generation(query, torch.full((4, 2), 5), [1], 0, ["a", "b", "c", "d"], family_of(tiny_model), image_features=features)
    picked = rollout.select([2, 0])
    alone = encode_images(tiny_model, picked.pixel_values, picked.image_grid_thw)  # 2 images through the tower, not 4
    for x, y in zip(picked.image_features.per_image, alone.per_image, strict=True):
        assert_equal_to_rounding(x, y, "features")
    assert picked.model_inputs(tiny_model).keys() == {"input_ids", "attention_mask", "mm_token_type_ids", "mm_encoder_outputs", "image_grid_thw"}
    assert "pixel_values" in picked.model_inputs().keys()  # no model named: pixels
    # features of other rows are caught before any forward, by the feature-row count
    wrong = replace(picked, image_features=rollout.select([1, 3]).image_features)
    if [f.shape[0] for f in wrong.image_features.per_image] != [f.shape[0] for f in picked.image_features.per_image]:
        with pytest.raises(MultimodalIntegrityError, match="encoded image features have"):
            response_logprobs(tiny_model, wrong, 1.0)
    short = replace(picked, image_features=features.select([2]))
    with pytest.raises(MultimodalIntegrityError, match="encoded image features have"):
        response_logprobs(tiny_model, short, 1.0)


def test_learned_reward_model_with_the_same_tower_reads_the_features(tmp_path, tiny_model_dir, synthetic_data_dir):
    rm_on, rm_off = (VLMRewardModel.from_base(str(tiny_model_dir), name="rm") for _ in range(2))
    for rm in (rm_on, rm_off):  # the same random head on both
        rm.head.weight.data.copy_(torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(2)))
    on = with_value_head(make_trainer(tmp_path / "on", tiny_model_dir, synthetic_data_dir, reward=[rm_on], reuse_vision_features=True))
    off = with_value_head(make_trainer(tmp_path / "off", tiny_model_dir, synthetic_data_dir, reward=[rm_off], reuse_vision_features=False))
    assert [name for name, _ in on.sharing.reward_models] == ["rm"] and "reward model 'rm'" in on.sharing.describe()
    with tower_calls(on.model.policy, rm_on) as calls:
        reused = iteration(on)
    assert calls == [1, 0]
    assert rm_on.image_features_source is None  # only while scoring
    encoded = iteration(off)
    assert_same_iteration(reused, encoded)
    assert len(set(reused[1]["scores"].tolist())) > 1


def test_reuse_is_off_when_the_vision_tower_trains(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = with_value_head(make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], freeze_vision_tower=False))
    assert not trainer.sharing.enabled and "vision tower trains" in trainer.sharing.describe()
    with tower_calls(trainer.model.policy) as calls:
        rollout, _, steps = iteration(trainer)
    assert rollout.image_features is None and calls[0] > 1
    assert any("visual" in n and g.abs().sum() > 0 for n, g in steps[0].items())  # the tower did get gradients
    # features of a trainable tower are refused by a forward that wants its gradients
    query = encode_prompts(trainer.processor, trainer.batch_samples(0)[:2])
    features = encode_images(trainer.model.policy, query["pixel_values"], query["image_grid_thw"])
    assert not features.usable_by(trainer.model.policy)
    with torch.no_grad():
        assert features.usable_by(trainer.model.policy)


def frozen_tower(model):
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)
    return model


def perturbed_tower(model) -> None:
    """Another tower: every weight moved by noise of 0.02 (the tiny model's init std), seeded."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in vision_tower(model).parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))


def test_reuse_is_off_for_a_reference_or_reward_model_with_another_tower(tmp_path, tiny_model_dir, synthetic_data_dir):
    config = make_config(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[], **MICRO)
    policy, reference = load_policy_and_reference(config)
    perturbed_tower(reference)
    rm = VLMRewardModel.from_base(str(tiny_model_dir), name="rm")
    perturbed_tower(rm)
    trainer = PPOTrainer(
        args=config, processing_class=load_processor(config.model_name_or_path), model=policy, ref_model=reference,
        reward=load_rewards([rm]), train_dataset=load_samples(config.train_data),
    )
    with_value_head(trainer)
    plan = trainer.sharing
    assert plan.enabled and not plan.reference and not plan.reward_models
    assert "reference (different vision weights" in plan.describe() and "reward model 'rm' (different vision weights" in plan.describe()
    with tower_calls(policy, reference, rm) as calls:
        rollout, old, _ = iteration(trainer)
    assert calls[0] == 1 and calls[1] == 3 and calls[2] >= 1  # the reference and the reward model encode for themselves
    with torch.no_grad():
        own, _ = response_logprobs(reference, replace(rollout, image_features=None), config.temperature)
        borrowed, _ = response_logprobs(reference, replace(rollout, image_features=replace(rollout.image_features, towers=frozenset({id(vision_tower(reference))}))), config.temperature)
        scores_own = rm([s["prompt"] for s in trainer.batch_samples(0)], old["completions"], images=[s["images"] for s in trainer.batch_samples(0)], completion_ended=rollout.has_eos.tolist())
    # micro-batches of 3 (each dropping its own padding columns) vs the whole batch at once: to float rounding
    assert_equal_to_rounding(old["ref_logprobs"], own, "ref_logprobs")
    assert (own - borrowed).abs().max() > 1e-2  # the policy's features would have been wrong for this reference
    assert old["scores"].tolist() == scores_own  # the same samples in one reward call both ways: the same shapes


def test_features_are_used_only_in_the_autocast_state_they_were_encoded_in(tiny_model, tiny_processor, synthetic_data_dir):
    samples = list(load_samples(synthetic_data_dir / "train.jsonl"))[:2]
    frozen_tower(tiny_model)
    query = encode_prompts(tiny_processor, samples)
    features = encode_images(tiny_model, query["pixel_values"], query["image_grid_thw"])
    assert features.usable_by(tiny_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not features.usable_by(tiny_model)
        bf16 = encode_images(tiny_model, query["pixel_values"], query["image_grid_thw"])
        assert bf16.usable_by(tiny_model)
    assert not bf16.usable_by(tiny_model)


def test_plan_compares_towers_exactly(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    load = lambda **kw: Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, **kw).eval()  # noqa: E731
    policy, copy, bf16 = frozen_tower(load()), load(), load(dtype=torch.bfloat16)
    assert plan_sharing(policy, copy, [], enabled=True).reference
    assert not plan_sharing(policy, bf16, [], enabled=True).reference  # another dtype computes other features
    assert "in torch.bfloat16" in plan_sharing(policy, bf16, [], enabled=True).describe()
    with torch.no_grad():
        vision_tower(copy).blocks[-1].mlp.fc2.bias[0] += 1e-6
    assert not plan_sharing(policy, copy, [], enabled=True).reference
    assert not plan_sharing(policy, None, [], enabled=False).enabled


def test_reward_lookup_matches_images_pixel_for_pixel(tiny_model):
    frozen_tower(tiny_model)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    a = (torch.arange(16 * 1176).reshape(16, 1176) % 11).float()  # small integers: every sum is exact
    b = a.flip(0)  # the same grid and pixel sum, other pixels
    features = encode_images(tiny_model, torch.cat([a, b]), grid)
    split = family_of(tiny_model).image_layout.split
    lookup = FeatureLookup(split({"pixel_values": torch.cat([a, b]), "image_grid_thw": grid}), features)
    found = lookup.find(tiny_model, split({"pixel_values": torch.cat([b, a]), "image_grid_thw": grid}))
    assert torch.equal(found.per_image[0], features.per_image[1]) and torch.equal(found.per_image[1], features.per_image[0])  # the stored tensors, handed back
    other = a[[1, 0, *range(2, 16)]]  # a third image with that grid and sum
    assert lookup.find(tiny_model, split({"pixel_values": torch.cat([a, other]), "image_grid_thw": grid})) is None  # one not found: all encoded


def test_training_says_which_models_share_the_features(tmp_path, tiny_model_dir, synthetic_data_dir, capsys):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], total_episodes=8, per_device_train_batch_size=4)
    trainer.train()
    assert "vision features: each rollout image encoded once, shared by generate, old-policy, value, training forwards, reference" in capsys.readouterr().out
