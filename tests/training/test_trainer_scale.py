"""The knobs users turn to scale up change nothing but speed and memory: gradient accumulation, bf16."""

import pytest
import torch

from trainer_helpers import completion_length, log_history, make_trainer, parameters, record_gradients, rollout_and_old, start


def adam_steps(trainer) -> set[int]:
    return {int(state["step"]) for state in trainer.optimizer.state.values()}


def test_one_optimizer_step_per_mini_batch_whatever_the_accumulation(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length],
        per_device_train_batch_size=2, gradient_accumulation_steps=4, num_mini_batches=2, num_ppo_epochs=2,
    )  # fmt: skip
    start(trainer)
    _, rollout, old = rollout_and_old(trainer)
    assert len(rollout) == 16
    trainer.optimise(rollout, old)
    assert adam_steps(trainer) == {2 * 2}  # num_ppo_epochs x num_mini_batches, not x gradient_accumulation_steps


def mini_batch_gradient(tmp_path, model_dir, data_dir, micro: int, accumulation: int) -> dict[str, torch.Tensor]:
    """The (clipped) gradient the optimiser steps with, for one mini-batch of 8 split as micro x accumulation."""
    trainer = make_trainer(
        tmp_path / f"{micro}x{accumulation}", model_dir, data_dir, reward=[completion_length],
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, num_mini_batches=1,
        max_grad_norm=1.0, kl_coef=0.1,
    )  # fmt: skip
    start(trainer)
    _, rollout, old = rollout_and_old(trainer)
    grads = record_gradients(trainer)
    torch.manual_seed(1)  # the same mini-batch order for every split
    trainer.optimise(rollout, old)
    return grads


def test_mini_batch_gradient_does_not_depend_on_its_micro_batch_split(tmp_path, tiny_model_dir, synthetic_data_dir):
    whole = mini_batch_gradient(tmp_path, tiny_model_dir, synthetic_data_dir, 8, 1)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in whole.values()))
    assert norm > 1e-3  # a real signal
    for micro, accumulation in [(4, 2), (2, 4)]:
        split = mini_batch_gradient(tmp_path, tiny_model_dir, synthetic_data_dir, micro, accumulation)
        assert split.keys() == whole.keys()
        for name, g in whole.items():
            assert torch.allclose(split[name], g, rtol=1e-5, atol=1e-5 * float(norm)), (micro, accumulation, name)


def test_bf16_trains_fp32_master_weights_with_an_fp32_value_head(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], bf16=True, learning_rate=3e-6,
        per_device_train_batch_size=8, gradient_accumulation_steps=1,
    )  # fmt: skip
    start(trainer)
    assert trainer.accelerator.mixed_precision == "bf16"  # forwards under bf16 autocast
    policy = trainer.model.policy
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    assert trainer.ref_model.dtype == torch.float32  # held as the policy is, so that it computes as the policy does
    before = parameters(trainer.model)
    _, rollout, old = rollout_and_old(trainer)
    assert old["values"].dtype == torch.float32 and old["logprobs"].dtype == torch.float32
    trainer.model_wrapped.train()
    with torch.no_grad():
        logprobs, _, values = trainer.model_wrapped(rollout, trainer.args.temperature)
    assert values.dtype == torch.float32 and logprobs.dtype == torch.float32
    trainer.optimise(rollout, old)
    moved = total = 0
    for name, p in trainer.model.named_parameters():
        if p.requires_grad and "embed_tokens" not in name and "lm_head" not in name:  # rows of unseen tokens get no gradient
            moved += int((p.detach() != before[name]).sum())
            total += p.numel()
    assert moved / total > 0.95  # with bf16 weights, lr 3e-6 leaves most entries unchanged (rounding)


def test_bf16_weights_is_an_explicit_choice(tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, bf16=True, bf16_weights=True)
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.policy.parameters())
    assert trainer.model.value_head.summary.weight.dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tuning", ["full", "lora", "sft_adapter"])
def test_the_reference_gives_the_policys_starting_logprobs(tmp_path, tiny_model_dir, synthetic_data_dir, precision, tuning):
    """Before any update KL(policy || reference) is 0, token for token: the reference computes exactly as the policy
    does (under --bf16: the same fp32 weights under the same autocast), so the KL penalty pulls toward the policy's
    true start and the reference can read the policy's vision features."""
    from trainer_helpers import make_sft_adapter

    model = make_sft_adapter(tiny_model_dir, tmp_path / "sft-adapter") if tuning == "sft_adapter" else tiny_model_dir
    lora = dict(use_peft=True, lora_r=4, lora_alpha=8) if tuning == "lora" else {}
    trainer = make_trainer(tmp_path, model, synthetic_data_dir, reward=[completion_length], bf16=precision == "bf16", **lora)
    start(trainer)
    assert trainer.sharing.reference  # the reference reads the policy's image features
    _, rollout, old = rollout_and_old(trainer)
    assert torch.equal(old["logprobs"], old["ref_logprobs"]) and not old["kl"].any()


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_biased_kl_reward_estimators_warn(tmp_path, tiny_model_dir, synthetic_data_dir, estimator):
    from trainer_helpers import make_config

    with pytest.warns(UserWarning, match="only k1 gives an unbiased gradient"):
        make_config(tmp_path, tiny_model_dir, synthetic_data_dir, kl_estimator=estimator)


def test_shipped_configs_use_k1():
    from pathlib import Path

    import yaml

    for path in (Path(__file__).resolve().parents[2] / "configs").glob("ppo*.yaml"):
        assert yaml.safe_load(path.read_text()).get("kl_estimator", "k1") == "k1", path


def test_accumulating_4_micro_batches_trains_like_one_big_batch(tmp_path, tiny_model_dir, synthetic_data_dir):
    # The same mini-batch of 8 per step, as 1 x 8 and as 4 micro-batches of 2: same steps, same curves.
    settings = dict(reward=[completion_length], learning_rate=3e-3, kl_coef=0.5, max_new_tokens=8, num_ppo_epochs=2, total_episodes=32)
    runs = {}
    for micro, accumulation in [(8, 1), (2, 4)]:
        trainer = make_trainer(
            tmp_path / f"{micro}x{accumulation}", tiny_model_dir, synthetic_data_dir,
            per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, **settings,
        )  # fmt: skip
        trainer.train()
        assert adam_steps(trainer) == {4 * 2}  # 4 iterations x num_ppo_epochs x 1 mini-batch
        runs[accumulation] = log_history(tmp_path / f"{micro}x{accumulation}" / "run")
    one, four = runs[1], runs[4]
    assert [h["step"] for h in one] == [h["step"] for h in four] == [1, 2, 3, 4]
    assert len({h["objective/scores"] for h in one}) > 1  # the policy moves
    for a, b in zip(one, four):  # (not policy/approxkl_avg: as in TRL, a mean of micro-batch means, split-dependent)
        for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr"):
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-5), (a["step"], name)


@pytest.mark.parametrize("generations", [1, 4])
def test_activation_checkpointing_changes_memory_not_gradients(tmp_path, tiny_model_dir, synthetic_data_dir, generations):
    # G = 4: without checkpointing each training forward runs a group's prompt once; with it (which drops a KV cache
    # in a training forward) every row whole: the same gradient to float rounding
    grads = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            tmp_path / str(checkpointing), tiny_model_dir, synthetic_data_dir, reward=[completion_length],
            activation_checkpointing=checkpointing, num_generations=generations,
        )  # fmt: skip
        assert trainer.model.policy.is_activation_checkpointing == checkpointing
        start(trainer)
        _, rollout, old = rollout_and_old(trainer)
        assert (rollout.prompt_ids is not None) == (generations > 1)
        grads.append(record_gradients(trainer))
        torch.manual_seed(1)
        trainer.optimise(rollout, old)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads[0].values())))
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6 if generations == 1 else 1e-5 * norm), name
