"""One forward -> response logprobs/entropy/values: exact, padding-invariant, response-positions only, M-RoPE-safe."""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlm_rl.algorithms.advantages import compute_gae, kl_penalty, shape_rewards
from vlm_rl.data.formats import load_samples
from vlm_rl.models.families import family_of
from vlm_rl.rollout.generation import eos_token_ids, generation_config_swapped, make_generation_config, pad_token_id
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.rollout.batch import Rollout
from vlm_rl.data.prompts import encode_prompts, model_inputs
from vlm_rl.models.critic import Critic, PolicyAndValue
from vlm_rl.models.value_head import ValueHead

TEMPERATURE = 0.7


def rollout_for(model, processor, samples, responses=None, max_new_tokens=6):
    """Encode `samples`, generate (or take `responses`) and build the Rollout."""
    query = encode_prompts(processor, samples)
    tok = processor.tokenizer
    if responses is None:
        config = make_generation_config(tok, max_new_tokens=max_new_tokens, temperature=TEMPERATURE)
        inputs = model_inputs(query)
        with generation_config_swapped(model, config):
            out = model.generate(**inputs, generation_config=config)
        responses = out[:, query["input_ids"].shape[1] :]
    return Rollout.from_generation(query, responses, eos_token_ids(tok), pad_token_id(tok), [s["_source"] for s in samples], family_of(model))


@pytest.fixture()
def policy_and_value(tiny_model):
    head = ValueHead(tiny_model.config.text_config.hidden_size)
    torch.nn.init.normal_(head.summary.weight, std=0.5)  # non-zero values, so that the test can see them move
    return PolicyAndValue(tiny_model, Critic(head))


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return list(load_samples(synthetic_data_dir / "train.jsonl"))


def pick_by_prompt_length(samples, processor):
    """(a middle sample, one with a longer prompt, one with a shorter prompt)."""
    lengths = [int(encode_prompts(processor, [s])["attention_mask"].sum()) for s in samples[:16]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    short, middle, long = order[0], order[len(order) // 2], order[-1]
    assert lengths[short] < lengths[middle] < lengths[long]
    return samples[middle], samples[long], samples[short]


def test_logprobs_match_the_sampling_distribution(tiny_model, tiny_processor, samples):
    query = encode_prompts(tiny_processor, samples[:4])
    config = make_generation_config(tiny_processor.tokenizer, max_new_tokens=5, temperature=TEMPERATURE)
    inputs = model_inputs(query)
    with generation_config_swapped(tiny_model, config):
        out = tiny_model.generate(**inputs, generation_config=config, output_logits=True, return_dict_in_generate=True)
    responses = out.sequences[:, query["input_ids"].shape[1] :]
    tok = tiny_processor.tokenizer
    rollout = Rollout.from_generation(query, responses, eos_token_ids(tok), pad_token_id(tok), ["s"] * 4, family_of(tiny_model))
    with torch.no_grad():
        logprobs, _ = response_logprobs(tiny_model, rollout, TEMPERATURE)
    raw = torch.stack(out.logits, dim=1).float() / TEMPERATURE  # (B, T_r, V): the logits generate sampled from
    expected = torch.log_softmax(raw, -1).gather(-1, responses[..., None])[..., 0]
    mask = rollout.response_mask
    assert (logprobs[mask] - expected[mask]).abs().max() < 1e-5
    assert (logprobs[~mask] == 0).all()


def test_sample_is_padding_invariant(policy_and_value, tiny_model, tiny_processor, samples):
    target, longer, shorter = pick_by_prompt_length(samples, tiny_processor)
    torch.manual_seed(0)
    batch = rollout_for(tiny_model, tiny_processor, [target, longer, shorter], max_new_tokens=8)
    n = int(batch.response_mask[0].sum())
    alone = rollout_for(tiny_model, tiny_processor, [target], responses=batch.responses[:1, :n])
    assert alone.context_length < batch.context_length  # really a different padding
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def signals(rollout):
        with torch.no_grad():
            logprobs, entropy, values = policy_and_value(rollout, TEMPERATURE)
            ref, _ = response_logprobs(reference, rollout, TEMPERATURE)
        mask = rollout.response_mask
        kl = torch.where(mask, kl_penalty(logprobs, ref, "k3"), 0.0)
        rewards = shape_rewards(torch.linspace(0.5, 1.5, len(rollout)), kl, mask, kl_coef=0.1)
        advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
        return logprobs, entropy, values, advantages, returns

    in_batch = signals(batch)
    on_its_own = signals(alone)
    # Only the score differs between the two calls (linspace over a batch of 3 vs 1): align it.
    for name, a, b in zip(["logprobs", "entropy", "values"], in_batch[:3], on_its_own[:3]):
        assert torch.allclose(a[0, :n], b[0], atol=1e-5), name
        assert (a[0, n:] == 0).all(), name
    batch_adv = signals(batch.select([0]))[3]
    assert torch.allclose(batch_adv[0, :n], on_its_own[3][0], atol=1e-5)


def test_concat_joins_rollouts_of_other_paddings_row_for_row(tiny_model, tiny_processor, samples):
    # Dynamic sampling joins the groups it keeps from several rollouts: queries of other lengths, responses of other
    # widths, each with its images' encoded features. Row for row, the joined batch holds the same tokens, images and
    # features, and (padding invariance) the same logprobs.
    from dataclasses import replace

    from vlm_rl.models.vision_features import encode_images

    target, longer, shorter = pick_by_prompt_length(samples, tiny_processor)
    for module in family_of(tiny_model).vision_encoder(tiny_model):
        module.requires_grad_(False)  # features are only reused from a frozen tower
    torch.manual_seed(0)
    parts = [rollout_for(tiny_model, tiny_processor, [target, shorter], max_new_tokens=8), rollout_for(tiny_model, tiny_processor, [longer], max_new_tokens=3)]
    parts = [replace(r, image_features=encode_images(tiny_model, r.pixel_values, r.image_grid_thw)) for r in parts]
    a, b = parts
    assert a.context_length < b.context_length and a.response_mask.shape[1] > b.response_mask.shape[1]
    joined = Rollout.concat(parts, pad_token_id(tiny_processor.tokenizer))
    rows = [(a, 0), (a, 1), (b, 0)]
    assert joined.sources == a.sources + b.sources and joined.num_images == a.num_images + b.num_images
    assert joined.has_eos.tolist() == a.has_eos.tolist() + b.has_eos.tolist()
    for row, (part, i) in enumerate(rows):
        assert torch.equal(joined.query_response[row][joined.attention_mask[row].bool()], part.query_response[i][part.attention_mask[i].bool()])
        assert torch.equal(joined.responses[row][joined.response_mask[row]], part.responses[i][part.response_mask[i]])
    assert all(torch.equal(x, y) for x, y in zip(joined.image_features.per_image, a.image_features.per_image + b.image_features.per_image))
    assert "mm_encoder_outputs" in joined.model_inputs(tiny_model)
    with torch.no_grad():
        together = response_logprobs(tiny_model, joined, TEMPERATURE)[0]
        apart = [response_logprobs(tiny_model, part, TEMPERATURE)[0] for part in parts]
    for row, (k, i) in enumerate([(0, 0), (0, 1), (1, 0)]):
        assert torch.allclose(together[row][joined.response_mask[row]], apart[k][i][parts[k].response_mask[i]], atol=1e-5)


def test_lm_head_sees_only_response_positions(tiny_model, tiny_processor, samples):
    rollout = rollout_for(tiny_model, tiny_processor, samples[:3], max_new_tokens=4)
    seen = []
    handle = tiny_model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        with torch.no_grad():
            response_logprobs(tiny_model, rollout, TEMPERATURE)
    finally:
        handle.remove()
    t_r = rollout.responses.shape[1]
    assert seen == [(3, t_r, tiny_model.config.text_config.hidden_size)]  # never (3, T_q + T_r, H)


def test_rope_deltas_from_generate_do_not_leak(tiny_model_dir, tiny_model, tiny_processor, samples):
    # generate() caches rope_deltas for the batch it saw; a later forward of another batch must not use them.
    first = rollout_for(tiny_model, tiny_processor, samples[:4], max_new_tokens=4)
    assert tiny_model.model.rope_deltas is not None
    second = rollout_for(tiny_model, tiny_processor, samples[4:6], responses=first.responses[:2])
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()  # any family (test_families.py)
    with torch.no_grad():
        after_generate, _ = response_logprobs(tiny_model, second, TEMPERATURE)
        clean, _ = response_logprobs(fresh, second, TEMPERATURE)
    assert torch.allclose(after_generate, clean, atol=1e-6)


def test_image_tokens_get_3d_positions(tiny_model, tiny_processor, samples):
    # Sanity of the M-RoPE inputs we pass: image tokens share a temporal index and span a 2-D grid.
    query = encode_prompts(tiny_processor, samples[:2])
    positions, _ = tiny_model.model.get_rope_index(
        query["input_ids"], query["mm_token_type_ids"], query["image_grid_thw"], attention_mask=query["attention_mask"]
    )
    image = query["mm_token_type_ids"][0].bool()
    t, h, w = positions[:, 0, image]
    assert len(set(t.tolist())) == 1 and len(set(h.tolist())) > 1 and len(set(w.tolist())) > 1


def test_nothing_after_eos_is_trained_on(policy_and_value, tiny_model, tiny_processor, samples):
    from vlm_rl.algorithms.losses import PolicyObjective, policy_loss, value_loss

    tok = tiny_processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    responses = torch.tensor([[15, 16, im_end, 17, 18], [15, 16, 17, 18, 19]])
    rollout = rollout_for(tiny_model, tiny_processor, samples[:2], responses=responses)
    assert rollout.response_mask.tolist()[0] == [True, True, True, False, False]
    assert rollout.responses[0, 3:].tolist() == [pad_token_id(tok)] * 2  # replaced by pad
    assert rollout.attention_mask[0, -2:].tolist() == [0, 0]  # and not attended to

    def grads(advantage_after_eos):
        policy_and_value.zero_grad()
        logprobs, _, values = policy_and_value(rollout, TEMPERATURE)
        adv = torch.ones_like(logprobs)
        adv[0, 3:] = advantage_after_eos
        loss = policy_loss(logprobs, logprobs.detach() - 0.1, adv, rollout.response_mask, PolicyObjective(epsilon_low=0.2))[0]
        loss = loss + value_loss(values, values.detach(), adv, rollout.response_mask, 0.2)[0]
        loss.backward()
        return [p.grad.clone() for p in policy_and_value.parameters() if p.grad is not None]

    for a, b in zip(grads(0.0), grads(1e6)):  # exact: the same forward and backward; only masked-out values differ
        assert torch.equal(a, b)
