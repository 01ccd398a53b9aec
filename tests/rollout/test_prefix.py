"""A group costs one prompt (vlm_rl/rollout/prefix.py): `generate` prefills each distinct prompt once and a forward
runs it once, its KV cache repeated for its rows; the tokens and numbers are those of the per-row path (greedy
tokens identical, logprobs and gradients to float rounding). Every test runs for every family in
tests/models/test_families.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vlm_rl.data.formats import load_samples
from vlm_rl.data.prompts import encode_prompts, model_inputs
from vlm_rl.models.critic import Critic, PolicyAndValue
from vlm_rl.models.families import family_of
from vlm_rl.models.value_head import ValueHead
from vlm_rl.rollout.batch import Rollout
from vlm_rl.rollout.generation import eos_token_ids, generate_responses, make_generation_config, pad_token_id
from vlm_rl.rollout.logprobs import response_logprobs

TEMPERATURE = 0.7
ROWS = [0, 0, 0, 1, 1, 2, 2, 2]  # each row's prompt: three prompts, groups of uneven size


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return list(load_samples(synthetic_data_dir / "train.jsonl"))


def inputs_of(query: dict) -> dict:
    return model_inputs(query)


def prompts_and_rows(processor, samples) -> tuple[dict, dict, torch.Tensor]:
    """(the three distinct prompts encoded, every row's prompt encoded as the per-row path does, ROWS)."""
    distinct = samples[:3]
    return encode_prompts(processor, distinct), encode_prompts(processor, [distinct[r] for r in ROWS]), torch.tensor(ROWS)


def language_model_calls(model, run) -> list[tuple[int, int]]:
    """(rows, tokens) of every call of the language model during `run()`."""
    seen = []
    language_model = getattr(model.model, family_of(model).language_model_module)

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        seen.append(tuple(embeds.shape[:2]))

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def generate_logits(model, run) -> torch.Tensor:
    """The LM head's logits at every decoding step of the `generate` in `run()` `(B, T_r, V)`: what it sampled from."""
    steps = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: steps.append(output[:, -1].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return torch.stack(steps, dim=1)


def rollout_of(query, responses, processor, model, rows=None) -> Rollout:
    tok = processor.tokenizer
    return Rollout.from_generation(query, responses, eos_token_ids(tok), pad_token_id(tok), [f"s{i}" for i in range(len(responses))], family_of(model), rows=rows)


def test_greedy_group_prefill_gives_the_per_row_tokens(tiny_model, tiny_processor, samples):
    model, processor = tiny_model, tiny_processor
    distinct, per_row, rows = prompts_and_rows(processor, samples)
    config = make_generation_config(processor.tokenizer, max_new_tokens=6, do_sample=False)
    alone = []
    calls_alone = language_model_calls(model, lambda: alone.append(generate_responses(model, inputs_of(per_row), config)))
    shared = []
    calls_shared = language_model_calls(model, lambda: shared.append(generate_responses(model, inputs_of(distinct), config, rows=rows)))
    assert torch.equal(shared[0], alone[0])
    t_q = per_row["input_ids"].shape[1]
    assert calls_alone[0] == (8, t_q)  # every row's prompt
    assert calls_shared[:2] == [(3, t_q - 1), (8, 1)]  # each prompt once (but its last token), then every row on from it


def test_sampled_group_tokens_have_the_logprobs_a_forward_recomputes(tiny_model, tiny_processor, samples):
    model, processor = tiny_model, tiny_processor
    distinct, per_row, rows = prompts_and_rows(processor, samples)
    config = make_generation_config(processor.tokenizer, max_new_tokens=6, temperature=TEMPERATURE)
    out = []
    raw = generate_logits(model, lambda: out.append(generate_responses(model, inputs_of(distinct), config, seed=3, rows=rows)))
    responses = out[0]
    # the same random numbers as the per-row path: the same tokens from the same seed
    assert torch.equal(responses, generate_responses(model, inputs_of(per_row), config, seed=3))
    expected = torch.log_softmax(raw.float() / TEMPERATURE, -1).gather(-1, responses[..., None])[..., 0]  # (B, T_r)
    rollout = rollout_of(distinct, responses, processor, model, rows)
    assert rollout.prompt_ids == tuple(ROWS) and torch.equal(rollout.query_response[:, : per_row["input_ids"].shape[1]], per_row["input_ids"])
    mask = rollout.response_mask
    with torch.no_grad():
        for shared in (True, False):  # a forward that runs each prompt once, and the full forward per row
            logprobs, _ = response_logprobs(model, rollout if shared else replace(rollout, prompt_ids=None), TEMPERATURE)
            assert (logprobs[mask] - expected[mask]).abs().max() < 1e-5, shared


def test_shared_prompt_forward_gives_the_full_forwards_numbers_and_gradients(tiny_model, tiny_processor, samples):
    model, processor = tiny_model, tiny_processor
    distinct, per_row, rows = prompts_and_rows(processor, samples)
    config = make_generation_config(processor.tokenizer, max_new_tokens=8, temperature=TEMPERATURE)
    responses = generate_responses(model, inputs_of(distinct), config, seed=0, rows=rows)
    eos = eos_token_ids(processor.tokenizer)[0]
    for row, end in enumerate([1, 7, 3, 0, 5, 2, 6, 4]):  # responses of several lengths, padding after the eos
        responses[row, end] = eos
    rollout = rollout_of(distinct, responses, processor, model, rows)
    assert rollout.response_lengths.tolist() == [2, 8, 4, 1, 6, 3, 7, 5]
    head = ValueHead(model.config.text_config.hidden_size)
    torch.nn.init.normal_(head.summary.weight, std=0.5)
    policy_and_value = PolicyAndValue(model, Critic(head)).train()
    weights = torch.randn(rollout.response_mask.shape, generator=torch.Generator().manual_seed(0))

    def forward_and_backward(batch: Rollout):
        policy_and_value.zero_grad(set_to_none=True)
        logprobs, entropy, values = policy_and_value(batch, TEMPERATURE)
        ((logprobs + 0.1 * entropy) * weights).sum().add(values.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy_and_value.named_parameters() if p.grad is not None}
        return (logprobs.detach(), entropy.detach(), values.detach()), grads

    results = []
    shared_calls = language_model_calls(model, lambda: results.append(forward_and_backward(rollout)))
    full_calls = language_model_calls(model, lambda: results.append(forward_and_backward(replace(rollout, prompt_ids=None))))
    trimmed = rollout.trimmed()
    t_q, t_r = trimmed.context_length, trimmed.response_mask.shape[1]
    assert shared_calls == [(3, t_q), (8, t_r - 1)] and full_calls == [(8, t_q + t_r)]  # each prompt once, then the responses
    (shared, shared_grads), (full, full_grads) = results
    mask = rollout.response_mask
    for a, b in zip(shared, full):  # to float rounding: the same sums over other shapes
        assert (a - b)[mask].abs().max() < 1e-5 and (a[~mask] == 0).all()
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in full_grads.values()))
    assert norm > 1e-3 and shared_grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        assert torch.allclose(shared_grads[name], g, rtol=1e-4, atol=1e-5 * float(norm)), name


def test_a_forward_that_would_drop_the_cache_runs_every_row_whole(tiny_model):
    from vlm_rl.rollout.prefix import caches_in_forward

    backbone = tiny_model.model
    assert caches_in_forward(backbone)
    tiny_model.activation_checkpointing_enable()
    tiny_model.train()
    assert not caches_in_forward(backbone)  # a training forward with checkpointing: transformers drops the cache
    with torch.no_grad():
        assert caches_in_forward(backbone)  # no backward to replay: the cache is kept
    tiny_model.eval()
    assert caches_in_forward(backbone)
