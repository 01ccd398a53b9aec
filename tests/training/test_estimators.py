"""The advantage estimators (gae, grpo, rloo, reinforce_pp) and the critic warm-up in the trainer.

Each estimator's advantages on a real rollout equal its formula recomputed here by hand (plain Python) from the
scores and an independent KL; groups of num_generations samples are whole and consecutive; the critic-free
estimators have no value head at all; each estimator learns a reward; the warm-up trains the value head alone.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import (
    check_resume_reproduces_the_run,
    check_resumed_run,
    completion_length,
    log_history,
    make_trainer,
    negative_completion_length,
    parameters,
    rollout_and_old,
    sampled_lengths,
    start,
)
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from vlm_rl import ppo
from vlm_rl.training import trainer as trainer_module
from vlm_rl.training.checkpoint import CheckpointError
from vlm_rl.training.recipes import RECIPES, recipe_settings
from vlm_rl.training.config import ConfigError, PPOConfig
import vlm_rl.models.critic as critic_module
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.models.value_head import VALUE_HEAD_FILE, ValueHead, load_value_head, save_value_head

LEARNING = dict(
    learning_rate=1e-2, per_device_train_batch_size=8, gradient_accumulation_steps=1, num_ppo_epochs=4, max_new_tokens=8
)
GENERATIONS = {"gae": 1, "grpo": 4, "rloo": 4, "reinforce_pp": 1}


# ---- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(advantage_estimator="ppo"), "advantage_estimator"),
        (dict(advantage_estimator="grpo"), "num_generations"),  # default 1: no group to compare against
        (dict(advantage_estimator="rloo", num_generations=1), "num_generations"),
        (dict(num_generations=0), "num_generations"),
        (dict(advantage_estimator="grpo", num_generations=3), "num_generations=3 must divide the local batch"),
        (dict(num_generations=16), "num_generations=16 must divide the local batch"),  # a group larger than the batch
        (dict(advantage_estimator="reinforce_pp", critic_warmup_steps=2), "critic_warmup_steps"),
        (dict(advantage_estimator="grpo", num_generations=2, critic_warmup_steps=1), "critic_warmup_steps"),
        (dict(critic_warmup_steps=-1), "critic_warmup_steps"),
        (dict(advantage_estimator="rloo", num_generations=2, value_model_name_or_path="x"), "value_model_name_or_path"),
        (dict(advantage_estimator="reinforce_pp", whiten_rewards=True), "whiten_rewards"),
        (dict(advantage_estimator="rloo", num_generations=2, scale_rewards=False), "scale_rewards"),
        # the GRPO family's fields (README: the GRPO family)
        (dict(advantage_estimator="grpo", num_generations=2, scale_rewards="std"), "scale_rewards must be one of group, batch, none"),
        (dict(advantage_estimator="rloo", num_generations=2, scale_rewards="batch"), "scale_rewards is for advantage_estimator=grpo"),
        (dict(loss_type="sapo"), "loss_type must be one of .*TRL's sapo is not implemented"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(loss_type="cispo"), "cispo caps the importance weight at epsilon_high"),
        (dict(epsilon_high=0.0), "epsilon_high must be > 0"),
        (dict(delta=1.0), "delta caps the importance ratio"),
        (dict(loss_type="cispo", epsilon_high=5.0, delta=2.0), "delta caps the ratio of the clipped losses"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
        (dict(dynamic_sampling=True), "dynamic_sampling drops groups"),  # gae: no groups
        (dict(advantage_estimator="grpo", num_generations=2, dynamic_sampling=True, max_sampling_rounds=0), "max_sampling_rounds"),
        (dict(kl_coef=0.0, ref_model_name_or_path="x"), "ref_model_name_or_path loads the reference"),
        (dict(reward=["exact_match"], reward_weights=[1.0, 2.0]), "reward_weights has 2 weights for 1 reward"),
        (dict(reward=["exact_match:2"], reward_weights=[1.0]), "carries a weight already"),
    ],
)
def test_estimator_fields_are_checked_when_the_config_is_parsed(tmp_path, fields, named):
    # local batch 4 x 2 x 1 = 8
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match=named):
        PPOConfig(**base, **fields)


def test_k1_in_the_loss_without_bias_correction_warns(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.warns(UserWarning, match="its gradient, the score function, is 0 in expectation"):
        PPOConfig(**base, kl_in_loss=True, kl_estimator="k1", use_bias_correction_kl=False)
    assert PPOConfig(**base, kl_in_loss=True).kl_estimator == "k3" and PPOConfig(**base).kl_estimator == "k1"  # TRL's / ours


def test_valid_estimator_configs_parse(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert PPOConfig(**base).advantage_estimator == "gae" and PPOConfig(**base).num_generations == 1
    assert not PPOConfig(**base, advantage_estimator="grpo", num_generations=8, scale_rewards=False).uses_critic
    assert PPOConfig(**base, critic_warmup_steps=3, num_generations=2).uses_critic
    assert not PPOConfig(**base, advantage_estimator="reinforce_pp").uses_critic


# ---- batches of whole groups ------------------------------------------------------------------------------------


def test_batch_samples_are_whole_consecutive_groups_of_one_prompt(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, advantage_estimator="grpo", num_generations=4, total_episodes=None, num_train_epochs=2
    )
    dataset = trainer.train_dataset
    assert trainer.batches_per_epoch == len(dataset) // 2  # 8 samples = 2 prompts per iteration
    assert trainer.num_total_batches == 2 * trainer.batches_per_epoch  # an epoch is a pass over the prompts
    seen = []
    for iteration in range(trainer.batches_per_epoch):
        samples = trainer.batch_samples(iteration)
        assert len(samples) == 8
        prompts = [s["_source"] for s in samples]
        assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4 and prompts[0] != prompts[4]
        assert all(s["prompt"] == samples[4 * (i // 4)]["prompt"] for i, s in enumerate(samples))
        seen += prompts[::4]
    assert len(set(seen)) == len(seen) == len(dataset)  # one epoch visits every prompt once
    # The order is a fixed shuffle per epoch (resuming replays it), and the next epoch reshuffles.
    again = make_trainer(tmp_path / "again", tiny_model_dir, synthetic_data_dir, advantage_estimator="grpo", num_generations=4)
    assert [s["_source"] for s in again.batch_samples(3)] == [s["_source"] for s in trainer.batch_samples(3)]
    next_epoch = [s["_source"] for k in range(trainer.batches_per_epoch) for s in trainer.batch_samples(trainer.batches_per_epoch + k)[::4]]
    assert sorted(next_epoch) == sorted(seen) and next_epoch != seen


def test_two_ranks_split_the_global_batch_into_whole_groups(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, advantage_estimator="rloo", num_generations=4)
    one_rank = [[s["_source"] for s in trainer.batch_samples(k)][::4] for k in range(4)]
    # As on 2 processes: 16 samples, 4 prompts per iteration; rank r rolls out prompts 2r and 2r + 1 of them.
    monkeypatch.setattr(trainer, "prompts_per_batch", 4)
    monkeypatch.setattr(trainer, "batches_per_epoch", trainer.batches_per_epoch // 2)
    for iteration in range(2):
        ranks = []
        for rank in (0, 1):
            monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(process_index=rank))
            sources = [s["_source"] for s in trainer.batch_samples(iteration)]
            assert len(sources) == 8 and all(sources[i] == sources[4 * (i // 4)] for i in range(8))
            ranks += sources[::4]
        # the 2-rank global batch is the prompts two 1-rank iterations roll out, in the same order, none twice
        assert ranks == one_rank[2 * iteration] + one_rank[2 * iteration + 1]


def test_one_generation_keeps_the_batches_of_before(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir)  # gae, num_generations 1, local batch 8
    order = torch.randperm(len(trainer.train_dataset), generator=torch.Generator().manual_seed(trainer.args.seed))
    for k in (0, 2):
        expected = [trainer.train_dataset[int(i)]["_source"] for i in order[8 * k : 8 * k + 8]]
        assert [s["_source"] for s in trainer.batch_samples(k)] == expected


# ---- each estimator's advantages, recomputed by hand --------------------------------------------------------------


def length_but_second_of_four_unscored(prompts, completions, **kwargs):
    """Characters in the completion; None ("cannot score") for the second sample of every four."""
    return [None if i % 4 == 1 else float(len(c)) for i, c in enumerate(completions)]


def by_hand(estimator: str, scores: list, kl: list[list[float]], kl_coef: float, values: list[list[float]], gamma: float, lam: float, groups: int):
    """Each sample's per-token advantages from its score (None: unscored) and its valid tokens' KL and values."""
    n = len(scores)
    outcome = list(scores)
    if estimator in ("grpo", "rloo"):
        size = n // groups
        for g in range(groups):
            members = [i for i in range(g * size, (g + 1) * size) if scores[i] is not None]
            for i in members:
                others = [scores[j] for j in members if j != i]
                group = [scores[j] for j in members]
                if len(members) < 2:
                    outcome[i] = 0.0
                elif estimator == "rloo":  # Ahmadian et al. 2024: minus the mean of the other samples
                    outcome[i] = scores[i] - sum(others) / len(others)
                else:  # DeepSeekMath/TRL: (r - mean) / (unbiased std + 1e-4)
                    outcome[i] = (scores[i] - statistics.mean(group)) / (statistics.stdev(group) + 1e-4)
    advantages = []
    for i in range(n):
        if scores[i] is None:
            advantages.append([0.0] * len(kl[i]))
            continue
        rewards = [-kl_coef * k for k in kl[i]]
        rewards[-1] += outcome[i]
        if estimator == "gae":  # Schulman et al. 2016, V after the last token = 0
            a, adv = 0.0, []
            for t in reversed(range(len(rewards))):
                next_value = values[i][t + 1] if t + 1 < len(rewards) else 0.0
                a = rewards[t] + gamma * next_value - values[i][t] + gamma * lam * a
                adv.append(a)
        else:  # reward-to-go
            g, adv = 0.0, []
            for r in reversed(rewards):
                g = r + gamma * g
                adv.append(g)
        advantages.append(adv[::-1])
    if estimator in ("gae", "reinforce_pp"):  # whitened over every scored token of the batch (unbiased variance)
        flat = [a for i, row in enumerate(advantages) if scores[i] is not None for a in row]
        mean, var = statistics.mean(flat), statistics.variance(flat)
        advantages = [[(a - mean) / (var + 1e-8) ** 0.5 for a in row] if scores[i] is not None else row for i, row in enumerate(advantages)]
    return advantages


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_advantages_on_a_rollout_equal_the_formula_by_hand(tmp_path, tiny_model_dir, synthetic_data_dir, estimator):
    generations = {"gae": 1, "grpo": 4, "rloo": 4, "reinforce_pp": 2}[estimator]
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[length_but_second_of_four_unscored],
        **{**LEARNING, "advantage_estimator": estimator, "num_generations": generations, "kl_coef": 0.3, "max_unscored_fraction": 0.5},
    )
    start(trainer)
    with torch.no_grad():  # move the policy off the reference, so that the KL term is not zero
        g = torch.Generator().manual_seed(0)
        for name, p in trainer.model.policy.named_parameters():
            if "visual" not in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    _, rollout, old = rollout_and_old(trainer, iteration=0, seed=3)

    texts = trainer.processor.batch_decode(rollout.responses, skip_special_tokens=True)
    scores = [None if i % 4 == 1 else float(len(t)) for i, t in enumerate(texts)]
    reference = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        policy_lp, _ = response_logprobs(trainer.model.policy, rollout, trainer.args.temperature)
        ref_lp, _ = response_logprobs(reference, rollout, trainer.args.temperature)
    mask = rollout.response_mask
    kl = [(policy_lp[i] - ref_lp[i])[mask[i]].tolist() for i in range(len(texts))]
    values = [old["values"][i][mask[i]].tolist() for i in range(len(texts))]
    assert statistics.mean(abs(k) for row in kl for k in row) > 0.05  # a KL term that matters
    expected = by_hand(estimator, scores, kl, 0.3, values, trainer.args.gamma, trainer.args.lam, len(texts) // generations)

    for i in range(len(texts)):
        got = old["advantages"][i][mask[i]]
        assert torch.allclose(got, torch.tensor(expected[i]), rtol=1e-4, atol=1e-4), (i, got, expected[i])
        assert not old["advantages"][i][~mask[i]].any()
    scored_firsts = [row[0] for i, row in enumerate(expected) if scores[i] is not None]
    assert statistics.pstdev(scored_firsts) > 0.1  # the samples' advantages differ: a real test
    if estimator != "gae":
        assert trainer.model.value_head is None and not old["values"].any()


# ---- critic-free runs: no value head ------------------------------------------------------------------------------


def test_critic_free_runs_have_no_value_head_and_no_value_loss(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    def no_value_loss(*args, **kwargs):
        raise AssertionError("value loss computed for a critic-free estimator")

    monkeypatch.setattr(trainer_module, "value_loss", no_value_loss)
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **{
        **LEARNING, "advantage_estimator": "rloo", "num_generations": 2, "total_episodes": 16, "save_steps": 1,
    })
    assert trainer.model.value_head is None
    trainer.train()
    assert not any("value_head" in n for n, _ in trainer.model.named_parameters())
    optimised = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimised == sum(p.numel() for p in trainer.model.policy.parameters() if p.requires_grad)
    run = tmp_path / "run"
    for directory in (run, run / "checkpoint-1", run / "checkpoint-2"):
        assert (directory / "model.safetensors").exists() and not (directory / VALUE_HEAD_FILE).exists()
    for logged in log_history(run):
        assert "loss/policy_avg" in logged and "loss/value_avg" not in logged and "val/clipfrac_avg" not in logged


def test_ppo_entry_point_loads_no_value_head_for_a_critic_free_estimator(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    model_dir = tmp_path / "policy_with_head"  # a starting model that carries a value head
    Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    save_value_head(ValueHead(64), model_dir)
    settings = dict(
        model_name_or_path=str(model_dir), train_data=str(synthetic_data_dir / "train.jsonl"), use_cpu=True, report_to="none",
        per_device_train_batch_size=4, gradient_accumulation_steps=2, reward=["exact_match"],
    )
    assert ppo.build_trainer(PPOConfig(output_dir=str(tmp_path / "a"), **settings)).model.value_head is not None
    loaded = []
    monkeypatch.setattr(critic_module, "load_value_head", lambda *a: loaded.append(a) or load_value_head(*a))
    trainer = ppo.build_trainer(PPOConfig(output_dir=str(tmp_path / "b"), advantage_estimator="grpo", num_generations=4, **settings))
    assert trainer.model.value_head is None and loaded == []


# ---- learning -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starting_length(tmp_path_factory, tiny_model_dir, synthetic_data_dir):
    return sampled_lengths(make_trainer(tmp_path_factory.mktemp("start"), tiny_model_dir, synthetic_data_dir, **LEARNING))


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_each_estimator_learns_the_reward(tmp_path, tiny_model_dir, synthetic_data_dir, starting_length, estimator):
    # 20 iterations of 8 samples (~3 s); measured from fresh samples, starting at 18.4 characters:
    # gae 68.6, grpo 60.2, rloo 54.6, reinforce_pp 70.1.
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **{
        **LEARNING, "total_episodes": 160, "kl_coef": 0.0, "advantage_estimator": estimator, "num_generations": GENERATIONS[estimator],
    })
    trainer.train()
    assert sampled_lengths(trainer) > starting_length + 15, (estimator, starting_length, sampled_lengths(trainer))


# The recipes learn to answer shorter, up to 16 tokens: with dapo's overlong filtering (mask_truncated_completions)
# a response cut at max_new_tokens takes no part in the loss, so it learns only from the responses that end (at 8
# tokens nearly every response of the tiny model is cut), and a reward for length, which makes them rarer, starves it.
RECIPE_LEARNING = {**LEARNING, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def recipe_starting_length(tmp_path_factory, tiny_model_dir, synthetic_data_dir):
    return sampled_lengths(make_trainer(tmp_path_factory.mktemp("start16"), tiny_model_dir, synthetic_data_dir, **RECIPE_LEARNING))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_learns_the_reward(tmp_path, tiny_model_dir, synthetic_data_dir, recipe_starting_length, recipe):
    # 20 iterations with each published recipe's settings over the learning ones (README: the GRPO family).
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[negative_completion_length], **{
        **RECIPE_LEARNING, "total_episodes": 160, **recipe_settings(recipe), "num_generations": 4,
    })
    trainer.train()
    # measured: 32.9 characters -> dapo 0, dr_grpo 16, gspo 0
    assert sampled_lengths(trainer) < recipe_starting_length - 15, (recipe, recipe_starting_length, sampled_lengths(trainer))


# ---- resume -------------------------------------------------------------------------------------------------------


def test_resume_with_groups_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, synthetic_data_dir):
    settings = {**LEARNING, "total_episodes": 32, "kl_coef": 0.5, "num_ppo_epochs": 2, "advantage_estimator": "grpo", "num_generations": 4}
    history = check_resume_reproduces_the_run(tmp_path, tiny_model_dir, synthetic_data_dir, [completion_length], **settings)
    assert len({h["objective/scores"] for h in history}) > 1 and all(h["objective/kl"] != 0 for h in history[1:])
    run = tmp_path / "a" / "run"
    assert not (run / "checkpoint-2" / VALUE_HEAD_FILE).exists()

    # Another group size would replay other prompts: refused, naming the field.
    other = make_trainer(tmp_path / "c", tiny_model_dir, synthetic_data_dir, reward=[completion_length], **{**settings, "num_generations": 2})
    with pytest.raises(CheckpointError, match="num_generations"):
        other.train(resume_from_checkpoint=str(run / "checkpoint-2"))


# ---- critic warm-up -----------------------------------------------------------------------------------------------


def test_critic_warmup_trains_the_value_head_alone_then_the_policy_on_its_whole_schedule(tmp_path, tiny_model_dir, synthetic_data_dir):
    # weight_decay > 0: a policy weight that merely got a zero gradient would still decay.
    settings = {
        **LEARNING, "total_episodes": 32, "num_ppo_epochs": 2, "critic_warmup_steps": 2, "save_steps": 1,
        "save_total_limit": None, "weight_decay": 0.1, "critic_learning_rate": 2e-2,
    }  # fmt: skip
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], **settings)
    rates = []  # per optimiser step: (the policy's learning rate, the critic's)
    optimiser_step = trainer.optimiser_step

    def recording_step(*args):
        groups = trainer.optimizer.param_groups
        rates.append(tuple(next(g["lr"] for g in groups if g["critic"] == critic) for critic in (False, True)))
        optimiser_step(*args)

    trainer.optimiser_step = recording_step
    trainer.train()
    run = tmp_path / "run"
    start_weights = parameters(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir))
    policies = [parameters(Qwen2VLForConditionalGeneration.from_pretrained(run / f"checkpoint-{k}")) for k in (1, 2, 3)]
    heads = [load_value_head(run / f"checkpoint-{k}", 64).summary.weight.detach() for k in (1, 2, 3)]
    for warm in policies[:2]:  # iterations 1 and 2: the policy bit-identical to the start
        assert all(torch.equal(start_weights[n], warm[n]) for n in start_weights)
    assert heads[0].abs().sum() > 0 and not torch.equal(heads[0], heads[1])  # ... while the value head learns
    language = [n for n in start_weights if "visual" not in n]
    moved = sum(not torch.equal(start_weights[n], policies[2][n]) for n in language)
    assert moved > 0.8 * len(language)  # iteration 3: the policy trains
    history = log_history(run)
    assert all(h["loss/value_avg"] > 0 for h in history)

    # The linear schedule: the critic's over the run's 4 iterations, the policy's over the 2 that train it, so the
    # policy's first trained iteration has the full learning rate. Two steps per iteration (num_ppo_epochs 2).
    policy_rates = [1e-2, 1e-2, 1e-2, 5e-3]  # (iterations 1-2: not used, the policy has no gradient)
    critic_rates = [2e-2, 1.5e-2, 1e-2, 5e-3]
    assert [r for pair in rates for r in pair] == pytest.approx([r for pair in zip(policy_rates, critic_rates) for r in 2 * pair])
    assert [h["lr"] for h in history] == pytest.approx(policy_rates)  # the rate each iteration used
    # Exact resume in the middle of the warm-up and after it.
    for at in (1, 3):
        check_resumed_run(run, at, tmp_path / f"resumed{at}", tiny_model_dir, synthetic_data_dir, [completion_length], **settings)


# ---- two DDP ranks ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo_unscored", "grpo_dynamic", "gae_warmup"])
def test_two_ranks_keep_groups_whole_and_warm_up_the_critic_alone(tmp_path, tiny_model_dir, synthetic_data_dir, estimator):
    """grpo_unscored: groups whole on each rank, and rank 1 unscored (its reward returns None for every sample: every
    collective is still issued alike on both ranks, the metrics are rank 0's), with the machine loaded, and the run
    ends cleanly. grpo_dynamic: dynamic sampling (each rank keeps its own groups with signal; the ranks make the same
    rounds, in step, whatever each one needed). gae_warmup (a LoRA policy with a lora critic): the warm-up trains the
    critic's adapter and head alone, on both ranks."""
    from test_ppo_entrypoint import ACCELERATE, cpu_load, run

    out = tmp_path / "run"
    # The warm-up keeps every parameter in the graph (the policy loss weighted 0, both adapters in the forward):
    # DDP needs no unused-parameter search.
    extra = {
        "gae_warmup": ["--critic_warmup_steps", "1", "--ddp_find_unused_parameters", "false", "--use_peft", "true", "--critic", "lora",
                       "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--reward", "trainer_helpers:completion_length"],
        "grpo_unscored": ["--advantage_estimator", "grpo", "--num_generations", "4", "--reward", "trainer_helpers:unscored_on_rank_1",
                          "--max_unscored_fraction", "0.5", "--missing_eos_penalty", "0"],  # (the logged scores are then the rewards')
        "grpo_dynamic": ["--advantage_estimator", "grpo", "--num_generations", "4", "--dynamic_sampling", "true", "--kl_coef", "0",
                         "--missing_eos_penalty", "0", "--reward", "trainer_helpers:colour_questions_only"],
    }[estimator]
    with cpu_load(1 if estimator == "grpo_unscored" else 0):
        run([*ACCELERATE, "--main_process_port", "0", "--multi_gpu", "--num_processes", "2", "tests/multiprocess/ppo_ranks.py",
             "--config", "configs/ppo_tiny.yaml", "--output_dir", str(out), "--report_to", "none",
             "--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_mini_batches", "1", "--total_episodes", "32", "--save_steps", "1",
             *extra],
            tmp_path, timeout=300)  # fmt: skip
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP in step
    assert not set(ranks[0]["sources"]) & set(ranks[1]["sources"])  # each rank its own prompts
    for r in (0, 1):  # the command ended the run: process group destroyed, no thread left, handlers restored
        assert json.loads((out / f"rank{r}_exit.json").read_text()) == {"process_group": False, "threads": [], "handlers": [True, True]}
    if estimator.startswith("grpo"):
        start_weights = parameters(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir))
        after = parameters(Qwen2VLForConditionalGeneration.from_pretrained(out / "checkpoint-1"))
        for r in ranks:  # 2 prompts per rank, each 4 times in a row
            assert [r["sources"][4 * (i // 4)] for i in range(8)] == r["sources"] and r["sources"][0] != r["sources"][4]
        assert not (out / VALUE_HEAD_FILE).exists()
        assert not all(torch.equal(start_weights[n], after[n]) for n in start_weights)  # the update reached both ranks
    if estimator == "grpo_unscored":
        # Each iteration's metrics: the scores are rank 0's (rank 1 has none), the step statistics too.
        history = log_history(out)
        assert len(history) == 2 and all(all(s["unscored"]) for s in ranks[1]["scored"])
        for logged, scored in zip(history, ranks[0]["scored"], strict=True):
            assert not any(scored["unscored"])
            assert logged["objective/scores"] == pytest.approx(statistics.mean(scored["scores"]))
            assert logged["objective/unscored"] == 0.5
            for name in ("policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "val/ratio", "loss/policy_avg"):
                assert math.isfinite(logged[name]), name
    elif estimator == "grpo_dynamic":
        # dynamic sampling: each rank's batch is whole groups of colour questions (the only ones with signal), scored
        # 0, 1, 0, 1; both ranks made the rounds the slower one needed, generating a whole batch each round
        for r in ranks:
            kept = r["sample_sources"]
            assert len(kept) == 8 and [kept[4 * (i // 4)] for i in range(8)] == kept and r["scores"] == [0.0, 1.0, 0.0, 1.0] * 2
        generated, _, filled, rounds = zip(*(r["dynamic_sampling"] for r in ranks))
        assert rounds[0] == rounds[1] == max(r["rounds_needed_alone"] for r in ranks) and filled == (0, 0)
        assert len({r["rounds_needed_alone"] for r in ranks}) == 2  # measured: 5 and 2, so one rank rolled out 3 more
        assert generated == (2 * rounds[0], 2 * rounds[0])
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        assert all(0 < h["dynamic_sampling/filtered_fraction"] < 1 for h in history)
    else:  # the first iteration trains the critic alone (its adapter and head); the second the policy's adapter too
        def lora_b(path: Path) -> torch.Tensor:  # the adapter's B matrices: all 0 until it trains (peft's init)
            return torch.cat([v.flatten() for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_B" in k])

        assert not lora_b(out / "checkpoint-1").any() and lora_b(out / "checkpoint-2").any()
        assert lora_b(out / "checkpoint-1" / "critic").any()
        assert load_value_head(out / "checkpoint-1" / "critic", 64).summary.weight.abs().sum() > 0
