"""PPOTrainer on the tiny model: the loop's invariants, its logs, checkpoints and exact resume."""

import json

import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from trainer_helpers import completion_length, make_sft_adapter, make_trainer, start
from vlm_rl.algorithms.advantages import shape_rewards
from vlm_rl.data.formats import load_samples
from vlm_rl.models.families import get_family
from vlm_rl.rollout.generation import eos_token_ids, pad_token_id
from vlm_rl.rollout.batch import Rollout
from vlm_rl.data.prompts import encode_prompts
from vlm_rl.models.value_head import load_value_head

TRL_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/non_score_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "val/num_eos_tokens",
    "eps",
    "episode",
    "lr",
]


def test_rollout_logprobs_equal_training_forward_at_epoch_0(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir)
    start(trainer)
    samples = trainer.batch_samples(0)
    rollout = trainer.make_rollout(samples)
    scored = trainer.score(rollout, samples)
    trainer.model_wrapped.train()
    logprobs, _, values = trainer.model_wrapped(rollout.select(range(len(rollout))), trainer.args.temperature)
    mask = rollout.response_mask
    assert (logprobs - scored["logprobs"])[mask].abs().max() < 1e-4
    assert (values - scored["values"])[mask].abs().max() < 1e-4
    # the reference starts as the policy, so the KL penalty starts at zero
    assert (scored["ref_logprobs"] - scored["logprobs"])[mask].abs().max() < 1e-4


def test_score_lands_on_last_real_token_even_when_pad_is_eos(tiny_processor, synthetic_data_dir):
    tok = tiny_processor.tokenizer
    eos = eos_token_ids(tok)
    pad = pad_token_id(tok)
    assert pad in eos
    samples = list(load_samples(synthetic_data_dir / "train.jsonl"))[:3]
    query = encode_prompts(tiny_processor, samples)
    responses = torch.tensor([[20, 21, pad, pad, pad], [20, eos[0], pad, pad, pad], [20, 21, 22, 23, 24]])
    rollout = Rollout.from_generation(query, responses, eos, pad, ["a", "b", "c"], get_family("qwen2_vl"))
    rewards = shape_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 5), rollout.response_mask, kl_coef=0.1)
    assert rewards.tolist() == [
        [0, 0, 1.0, 0, 0],  # on the <|endoftext|> eos, not on the identical pad after it
        [0, 2.0, 0, 0, 0],  # on the <|im_end|>
        [0, 0, 0, 0, 3.0],  # no eos: the last token
    ]


def test_ppo_step_changes_trainable_parameters_only(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir)
    start(trainer)
    policy = trainer.model.policy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    samples = trainer.batch_samples(0)
    rollout = trainer.make_rollout(samples)
    scored = trainer.score(rollout, samples)
    scored["scores"] = torch.linspace(-1, 1, len(rollout))  # a reward signal even if nothing is right yet
    trainer.optimise(rollout, {**scored, **trainer.advantages(rollout, scored)})
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = set(before) - trainable
    assert any(n.startswith("policy.model.visual") for n in frozen)  # vision tower frozen by default
    assert changed and changed <= trainable
    assert "critic.head.summary.weight" in changed
    assert len(changed) > 0.8 * len([n for n in trainable if "lm_head" not in n])
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())
    assert policy.training is False  # back in eval mode for the next rollout


def test_train_logs_checkpoints_and_resumes_exactly(tmp_path, tiny_model_dir, synthetic_data_dir):
    straight = make_trainer(tmp_path / "a", tiny_model_dir, synthetic_data_dir, save_steps=1, save_total_limit=None)
    straight.train()
    run = tmp_path / "a" / "run"
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2]
    for name in TRL_METRICS:
        assert all(name in h for h in history), name
    checkpoint = run / "checkpoint-1"
    for f in ["model.safetensors", "value_head.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pth", "manifest.json", "ppo_config.yaml", "tokenizer.json"]:
        assert (checkpoint / f).exists(), f
    Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)
    AutoProcessor.from_pretrained(checkpoint)
    load_value_head(checkpoint, 64)
    final = Qwen2VLForConditionalGeneration.from_pretrained(run)

    resumed = make_trainer(tmp_path / "b", tiny_model_dir, synthetic_data_dir, save_steps=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_history = json.loads((tmp_path / "b" / "run" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in resumed_history] == [1, 2]
    assert resumed_history[1]["objective/scores"] == history[1]["objective/scores"]
    assert resumed_history[1]["loss/policy_avg"] == pytest.approx(history[1]["loss/policy_avg"], abs=1e-6)
    resumed_final = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "b" / "run")
    for (name, a), (_, b) in zip(final.named_parameters(), resumed_final.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_lora_reference_is_the_base_with_adapters_disabled(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0
    )
    assert trainer.ref_model is None
    start(trainer)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("critic.head") for n in trainable)
    assert not any("visual" in n for n in trainable)
    trainer.train()
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    rollout = trainer.make_rollout(trainer.batch_samples(0))
    from vlm_rl.rollout.logprobs import response_logprobs

    with torch.no_grad():
        ref = trainer.reference_logprobs(rollout)
        expected, _ = response_logprobs(base, rollout, trainer.args.temperature)
        current, _ = response_logprobs(trainer.model.policy, rollout, trainer.args.temperature)
    mask = rollout.response_mask
    assert (ref - expected)[mask].abs().max() < 1e-5  # the reference is the untouched base
    assert (current - expected)[mask].abs().max() > 1e-4  # while the adapter has moved the policy
    assert (tmp_path / "run" / "adapter_config.json").exists()


def test_continued_adapter_reference_is_the_starting_adapter(tmp_path, tiny_model_dir, synthetic_data_dir):
    # An SFT adapter whose weights change the model (B != 0), then PPO continues it: the reference stays the
    # starting adapter on its base (held unmerged, as the policy's: equal to the merged model up to float rounding),
    # while the policy moves away from it.
    from peft import PeftModel

    from vlm_rl.rollout.logprobs import response_logprobs

    adapter = make_sft_adapter(tiny_model_dir, tmp_path / "sft-adapter")
    trainer = make_trainer(tmp_path, adapter, synthetic_data_dir, reward=[completion_length], learning_rate=1e-2, lora_dropout=0.0)
    assert isinstance(trainer.model.policy, PeftModel) and trainer.ref_model is not None
    trainer.train()
    merged = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir), adapter).merge_and_unload().eval()
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    rollout = trainer.make_rollout(trainer.batch_samples(0))
    mask = rollout.response_mask
    with torch.no_grad():
        ref = trainer.reference_logprobs(rollout)
        expected, _ = response_logprobs(merged, rollout, trainer.args.temperature)
        bare, _ = response_logprobs(base, rollout, trainer.args.temperature)
        current, _ = response_logprobs(trainer.model.policy, rollout, trainer.args.temperature)
    assert (ref - expected)[mask].abs().max() < 1e-5  # the starting adapter
    assert (bare - expected)[mask].abs().max() > 1e-2  # which is not the bare base
    assert (current - expected)[mask].abs().max() > 1e-4  # while the policy has moved on


def test_rewards_are_told_which_responses_ended(tmp_path, tiny_model_dir, synthetic_data_dir):
    import compare_helpers

    compare_helpers.calls.clear()
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=["compare_helpers:record_kwargs"], max_new_tokens=3)
    samples = trainer.batch_samples(0)
    rollout = trainer.make_rollout(samples)
    trainer.score(rollout, samples)
    [call] = compare_helpers.calls
    assert call["completion_ended"] == rollout.has_eos.tolist()
    assert call["answer"] == [s["answer"] for s in samples]  # and every dataset column
