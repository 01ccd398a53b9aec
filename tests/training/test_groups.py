"""A group costs one prompt in the trainer: with `num_generations` G each distinct image runs through the vision tower
once and each distinct prompt is processed and prefilled once, and the iteration's tokens, numbers and gradients are
those of the per-sample path (`share_prompts: false`); micro-batches by tokens (`max_tokens_per_micro_batch`) give the
fixed split's scores and gradient on a long tail of response lengths."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from test_vision_reuse import iteration

import vlm_rl.training.rollout_stage as rollout_stage
from trainer_helpers import completion_length, make_trainer, record_gradients, rollout_and_old, start
from vlm_rl.data.formats import load_samples
from vlm_rl.models.families import family_of
from vlm_rl.models.vision_features import vision_tower
from vlm_rl.rollout.integrity import check_model_inputs

SCORED = ("logprobs", "ref_logprobs", "values", "entropy")


@contextmanager
def tower_images(*models):
    """{"calls", "images", "rows"}: runs of the models' vision towers, the images (grid rows) they encoded and their
    patch rows."""
    seen = {"calls": 0, "images": 0, "rows": 0}

    def hook(module, args, kwargs):
        seen["calls"] += 1
        seen["images"] += kwargs.get("grid_thw", args[1] if len(args) > 1 else None).shape[0]
        seen["rows"] += kwargs.get("hidden_states", args[0] if args else None).shape[0]

    handles = [vision_tower(m).register_forward_pre_hook(hook, with_kwargs=True) for m in models]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def language_model_rows(model):
    """(rows, tokens) of every call of the language model (prompts prefilled or run, rows decoded)."""
    rows = []
    language_model = getattr(model.model, family_of(model).language_model_module)
    handle = language_model.register_forward_pre_hook(lambda m, a, kw: rows.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


@pytest.mark.parametrize("generations", [1, 4, 8])
def test_each_distinct_image_runs_through_the_tower_once_whatever_g(tmp_path, tiny_model_dir, synthetic_data_dir, generations):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], num_generations=generations,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, local_rollout_forward_batch_size=3,
    )  # fmt: skip
    start(trainer)
    prompts = 8 // generations
    with tower_images(trainer.model.policy, trainer.ref_model) as seen, language_model_rows(trainer.model.policy) as rows:
        samples, rollout, old = rollout_and_old(trainer)
        trainer.optimise(rollout, old)
    assert len({s["_source"] for s in samples}) == prompts
    patches = rollout.image_grid_thw.prod(-1)[:: generations].sum()  # each prompt's image (a group's rows are in a row)
    assert seen == {"calls": 1, "images": prompts, "rows": int(patches)}  # one run of the tower, over each prompt's image once
    assert rows[0][0] == prompts  # generate prefilled each prompt once
    features = rollout.image_features.per_image
    assert len(features) == 8 and len({id(f) for f in features}) == prompts  # every sample reads its prompt's features
    check_model_inputs(trainer.model.policy, rollout.model_inputs(trainer.model.policy), rollout.num_images, rollout.sources, "test")


def test_an_image_in_two_prompts_is_encoded_once(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length])
    start(trainer)
    rows = list(load_samples(synthetic_data_dir / "train.jsonl"))
    same = Image.frombytes("RGB", rows[0]["images"][0].size, rows[0]["images"][0].tobytes())  # another object, equal pixels

    def sample(i: int, question: str, image) -> dict:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return {"prompt": [{"role": "user", "content": content}], "images": [image], "_source": f"made:{i}"}

    samples = [sample(0, "What colour?", rows[0]["images"][0]), sample(1, "What shape?", same), sample(2, "What colour?", rows[1]["images"][0])]
    with tower_images(trainer.model.policy) as seen:
        rollout = trainer.make_rollout(samples * 2)  # three prompts, each twice
    assert (seen["calls"], seen["images"]) == (1, 2) and rollout.prompt_ids == (0, 1, 2, 0, 1, 2)
    features = rollout.image_features.per_image
    assert features[0] is features[1] is features[3] is features[4] and features[2] is features[5] is not features[0]


GRPO = dict(
    advantage_estimator="grpo", num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
    num_mini_batches=2, num_ppo_epochs=2, local_rollout_forward_batch_size=3, kl_coef=0.1, max_new_tokens=6,
)  # fmt: skip


def test_a_shared_group_iteration_is_the_per_sample_one(tmp_path, tiny_model_dir, synthetic_data_dir):
    shared_and_per_sample_iterations_agree(tmp_path, tiny_model_dir, synthetic_data_dir)


def test_a_shared_group_iteration_on_clips_is_the_per_sample_one(tmp_path, family_dirs, video_data_dir):
    """The same on clips and pictures (Qwen2.5-VL: the video's positions need its `second_per_grid_ts`)."""
    rollout = shared_and_per_sample_iterations_agree(tmp_path, family_dirs("qwen2_5_vl"), video_data_dir)
    assert rollout.videos is not None and rollout.videos.counts == [1] * 8  # two clips of the same question, 4 rows each


def shared_and_per_sample_iterations_agree(tmp_path, model_dir, data_dir):
    """One GRPO iteration with groups of 4 sharing their prompt, and with every sample on its own: the same tokens,
    the same numbers to float rounding; the shared one's rollout."""
    shared = make_trainer(tmp_path / "shared", model_dir, data_dir, reward=[completion_length], **GRPO)
    alone = make_trainer(tmp_path / "alone", model_dir, data_dir, reward=[completion_length], share_prompts=False, **GRPO)
    for trainer in (shared, alone):
        start(trainer)
    with language_model_rows(shared.model.policy) as rows_shared:
        (ra, oa, ga) = iteration(shared)
    with language_model_rows(alone.model.policy) as rows_alone:
        (rb, ob, gb) = iteration(alone)
    assert ra.prompt_ids == (0, 0, 0, 0, 1, 1, 1, 1) and rb.prompt_ids is None
    assert rows_shared[0][0] == 2 and rows_alone[0][0] == 8  # generate: each prompt prefilled once, or once per sample
    assert sum(r * t for r, t in rows_shared) < 0.6 * sum(r * t for r, t in rows_alone)  # tokens through the language model
    assert torch.equal(ra.query_response, rb.query_response)  # the same tokens from the same seed
    mask = ra.response_mask
    for key in SCORED + ("advantages",):  # to float rounding (other shapes, the same sums)
        assert (oa[key] - ob[key])[mask].abs().max() < 1e-5, key
    assert len(ga) == len(gb) == 4
    for step_a, step_b in zip(ga, gb):
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in step_b.values()))
        assert norm > 1e-3
        for name, g in step_b.items():
            assert torch.allclose(step_a[name], g, rtol=1e-4, atol=1e-5 * float(norm)), name
    return ra


LONG_TAIL = [13, 1, 32, 3, 8, 2, 21, 5]  # response lengths (log-spaced 1-32; 32: no eos)


def with_response_lengths(monkeypatch, eos_ids: list[int], token: int) -> None:
    """Every rollout's responses end (with an eos) at LONG_TAIL's lengths, whatever the model samples (an eos it
    sampled earlier becomes `token`)."""
    generate = rollout_stage.generate_responses

    def cut(*args, **kwargs):
        responses = generate(*args, **kwargs)
        responses = torch.cat([responses, responses.new_full((len(responses), 32 - responses.shape[1]), token)], dim=1)
        responses[torch.isin(responses, torch.tensor(eos_ids))] = token
        for row, length in enumerate(LONG_TAIL):
            if length < 32:
                responses[row, length - 1] = eos_ids[0]
        return responses

    monkeypatch.setattr(rollout_stage, "generate_responses", cut)


@pytest.mark.parametrize("estimator, generations", [("gae", 1), ("grpo", 4)])
def test_micro_batches_by_tokens_give_the_fixed_splits_gradient(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch, estimator, generations):
    settings = dict(
        reward=[completion_length], advantage_estimator=estimator, num_generations=generations, max_new_tokens=32,
        per_device_train_batch_size=2, gradient_accumulation_steps=4, local_rollout_forward_batch_size=3, kl_coef=0.1,
    )  # fmt: skip
    results, plans = {}, {}
    for budget in (None, 150):
        trainer = make_trainer(tmp_path / str(budget), tiny_model_dir, synthetic_data_dir, max_tokens_per_micro_batch=budget, **settings)
        start(trainer)
        with_response_lengths(monkeypatch, trainer.eos_ids, trainer.processor.tokenizer.convert_tokens_to_ids("a"))
        plan = plans[budget] = []
        planner = trainer.micro_batches
        trainer.micro_batches = lambda *a, planner=planner, plan=plan: plan.append(planner(*a)) or plan[-1]
        _, rollout, old = rollout_and_old(trainer)
        assert rollout.response_lengths.tolist() == LONG_TAIL
        grads = record_gradients(trainer)
        torch.manual_seed(1)  # the same mini-batch for both
        trainer.optimise(rollout, old)
        results[budget] = (old, grads)
        monkeypatch.undo()
    scoring, training = plans[150]
    assert sorted(r for mb in scoring for r in mb) == list(range(8))
    assert len({len(mb) for mb in scoring}) > 1 and len({len(mb) for mb in training}) > 1  # micro-batches of several sizes
    assert [len(mb) for mb in plans[None][1]] == [2, 2, 2, 2]
    (fixed, fixed_grads), (planned, planned_grads) = results[None], results[150]
    mask = fixed["train_mask"]
    for key in SCORED + ("advantages",):  # in row order again, to float rounding
        assert (planned[key] - fixed[key])[mask].abs().max() < 1e-5, key
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in fixed_grads.values()))
    assert norm > 1e-3 and planned_grads.keys() == fixed_grads.keys()
    for name, g in fixed_grads.items():
        assert torch.allclose(planned_grads[name], g, rtol=1e-4, atol=1e-5 * float(norm)), name


def test_every_rank_runs_as_many_micro_batches_as_the_busiest(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], max_tokens_per_micro_batch=10**6)
    start(trainer)
    _, rollout, _ = rollout_and_old(trainer)
    assert len(trainer.micro_batches(rollout, list(range(8)), 4)) == 1  # alone, the whole rollout fits the budget
    gathered = []

    def other_rank_needs_five(t):  # this rank plans one micro-batch, another five
        gathered.append(t)
        return torch.cat([t, torch.tensor([5])])

    monkeypatch.setattr(trainer.accelerator, "gather", other_rank_needs_five)
    plan = trainer.micro_batches(rollout, list(range(8)), 4)
    assert len(gathered) == 1 and gathered[0].tolist() == [1]
    assert len(plan) == 5 and sorted(r for mb in plan for r in mb) == list(range(8))


def test_learned_reward_models_score_by_tokens_during_the_rollout(tmp_path, tiny_model_dir, synthetic_data_dir):
    from reward_models.vlm_reward import VLMRewardModel

    rm = VLMRewardModel.from_base(str(tiny_model_dir), name="rm")
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[rm], max_tokens_per_micro_batch=150)
    start(trainer)
    budgets = []
    rm.backbone.register_forward_pre_hook(lambda *_: budgets.append(rm.max_tokens_per_micro_batch))
    rollout_and_old(trainer)
    assert budgets and set(budgets) == {150} and rm.max_tokens_per_micro_batch is None  # for the scoring only


@pytest.mark.parametrize("critic", ["separate", "lora"])
def test_a_critic_of_its_own_reads_a_shared_prompt_once_and_gives_the_per_sample_values(tmp_path, tiny_model_dir, synthetic_data_dir, critic):
    extra = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0) if critic == "lora" else {}
    runs = {}
    for share in (True, False):
        trainer = make_trainer(tmp_path / str(share), tiny_model_dir, synthetic_data_dir, reward=[completion_length], critic=critic,
                               num_generations=2, share_prompts=share, **extra)
        with torch.no_grad():  # a head that gives values of every size (the same on both)
            for p in trainer.model.critic.head.parameters():
                p.normal_(generator=torch.Generator().manual_seed(0))
        start(trainer)
        runs[share] = iteration(trainer)
    (ra, oa, ga), (rb, ob, gb) = runs[True], runs[False]
    assert ra.prompt_ids == (0, 0, 1, 1, 2, 2, 3, 3) and torch.equal(ra.query_response, rb.query_response)
    mask = ra.response_mask
    assert ob["values"][mask].abs().max() > 0.1
    for key in SCORED:
        assert (oa[key] - ob[key])[mask].abs().max() < 1e-5, key  # float rounding (values here reach ~10)
    for name, g in gb[0].items():
        assert torch.allclose(ga[0][name], g, rtol=1e-4, atol=1e-6), name
