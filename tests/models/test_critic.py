"""The three critics (shared value head, separate value model, LoRA critic): each trains only what it owns, leaves
the reference alone, saves and resumes exactly; the separate critic sees the image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import answer_is_red, completion_length, log_history, make_trainer, record_gradients, rollout_and_old, start

from vlm_rl.models.critic import CRITIC_DIR, load_separate_critic
from vlm_rl.data.formats import load_samples, prompt_text
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.data.synthetic import make_synthetic_data
from vlm_rl.models.value_head import VALUE_HEAD_FILE

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
MODES = {"shared": {}, "separate": {"critic": "separate"}, "lora": {"critic": "lora", **LORA}}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("mode", MODES)
def test_each_critic_trains_only_what_it_owns_and_leaves_the_reference_alone(mode, tmp_path, tiny_model_dir, synthetic_data_dir):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], critic_warmup_steps=1,
        critic_learning_rate=3e-3, **MODES[mode],
    )  # fmt: skip
    start(trainer)
    model = trainer.model
    owned = model.critic_parameter_names()
    critic = {n for n in owned if model.get_parameter(n).requires_grad}
    assert critic and all(".visual." in n for n in owned - critic)  # a separate critic's vision tower is frozen
    groups = {(g["critic"], g["lr"]) for g in trainer.optimizer.param_groups}
    assert groups == {(False, 1e-3), (True, 3e-3)}  # the critic's own parameter group, at critic_learning_rate
    in_critic_groups = {id(p) for g in trainer.optimizer.param_groups if g["critic"] for p in g["params"]}
    assert in_critic_groups == {id(model.get_parameter(n)) for n in critic}
    samples, rollout, old = rollout_and_old(trainer)
    old["advantages"] = torch.linspace(-1, 1, len(rollout))[:, None].expand_as(old["advantages"]).clone()
    reference = trainer.reference_logprobs(rollout)

    before = snapshot(model)  # iteration 1 is the critic warm-up: the value loss moves the critic only
    for _ in range(2):  # the head starts at 0: the second step is the first whose gradient reaches the backbone
        trainer.optimise(rollout, old)
    moved = changed(model, before)
    assert moved and moved <= critic, sorted(moved - critic)[:5]
    assert {n for n in critic if n.startswith("critic.head")} <= moved
    if mode != "shared":  # the critic's own backbone or adapter learns too, not only its head
        assert any(not n.startswith("critic.head") for n in moved)

    trainer.state.global_step = 1  # past the warm-up; with vf_coef 0 only the policy loss has a gradient
    trainer.args.vf_coef = 0.0
    grads = record_gradients(trainer)
    before = snapshot(model)
    trainer.optimise(rollout, old)
    assert changed(model, before) - critic  # the policy moved
    reached = {n for n, g in grads.items() if g.abs().sum() > 0}
    assert reached and not reached & critic, sorted(reached & critic)[:5]  # no policy gradient reaches the critic

    # exact: the same reference forward on the same rollout (same kernels, same shapes) before and after
    torch.testing.assert_close(trainer.reference_logprobs(rollout), reference, rtol=0, atol=0)
    with torch.no_grad():  # the policy's logprobs are its own adapter's (the critic's adapter is not left active)
        policy_logprobs, _, _ = model(rollout, trainer.args.temperature)
        alone = response_logprobs(model.policy, rollout, trainer.args.temperature)[0]
    torch.testing.assert_close(policy_logprobs, alone, rtol=0, atol=0)  # exact: one backbone forward and LM head, same shapes
    assert not torch.equal(policy_logprobs, reference)  # the policy moved away from the reference


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `directory` (checkpoints excluded), keyed by file and name."""
    return {
        f"{path.relative_to(directory)}:{name}": value
        for path in sorted(directory.rglob("*.safetensors"))
        if not any(part.startswith("checkpoint-") for part in path.relative_to(directory).parts)
        for name, value in load_file(str(path)).items()
    }


@pytest.mark.parametrize("mode", ["separate", "lora"])
def test_separate_and_lora_critics_save_and_resume_exactly(mode, tmp_path, tiny_model_dir, synthetic_data_dir):
    settings = dict(
        reward=[completion_length], kl_coef=0.5, learning_rate=1e-2, critic_learning_rate=3e-3, save_steps=1,
        save_total_limit=None, total_episodes=24, num_ppo_epochs=2, **MODES[mode],
    )  # fmt: skip
    make_trainer(tmp_path / "a", tiny_model_dir, synthetic_data_dir, **settings).train()
    run = tmp_path / "a" / "run"
    assert (run / CRITIC_DIR / VALUE_HEAD_FILE).exists() and (run / "checkpoint-1" / CRITIC_DIR / VALUE_HEAD_FILE).exists()
    straight = tensors(run)
    first = tensors(run / "checkpoint-1")
    body = [k for k in straight if k.startswith(CRITIC_DIR) and VALUE_HEAD_FILE not in k]  # the backbone or adapter
    assert body and any(not torch.equal(first[k], straight[k]) for k in body)  # moved after the checkpoint

    make_trainer(tmp_path / "b", tiny_model_dir, synthetic_data_dir, **settings).train(resume_from_checkpoint=str(run / "checkpoint-1"))
    history, resumed = log_history(run), log_history(tmp_path / "b" / "run")
    assert [h["step"] for h in resumed] == [1, 2, 3]
    for want, got in zip(history[1:], resumed[1:]):
        for name, value in want.items():
            if name != "eps":
                assert got[name] == pytest.approx(value, abs=1e-6, rel=1e-6), (want["step"], name)
    again = tensors(tmp_path / "b" / "run")
    assert again.keys() == straight.keys()
    for key, value in straight.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)

    if mode == "separate":  # the saved critic starts a new run's critic (value_model_name_or_path)
        loaded = load_separate_critic(str(run / CRITIC_DIR), torch.float32)
        assert torch.equal(loaded.head.summary.weight, load_file(str(run / CRITIC_DIR / VALUE_HEAD_FILE))["summary.weight"])


def test_the_separate_critic_sees_the_image(tmp_path, tiny_model_dir):
    """After a short critic-only run on the colour questions, two prompts with the same tokens (the same question,
    images of the same size) but different images get different values: the critic's input includes the pixels."""
    data = make_synthetic_data(tmp_path / "colours", n=200, seed=1, tasks=["colour"], test_fraction=0.3)
    trainer = make_trainer(
        tmp_path, tiny_model_dir, data, reward=[answer_is_red], critic="separate", critic_warmup_steps=100,
        critic_learning_rate=3e-3, per_device_train_batch_size=8, total_episodes=16 * 6, kl_coef=0.0,
    )  # fmt: skip
    assert trainer.sharing.critic  # the same frozen tower as the policy: it reads the rollout's image features
    trainer.train()
    held_out = [dict(s) for s in load_samples(str(data / "test.jsonl"))]
    torch.manual_seed(0)
    with torch.no_grad():
        rollout = trainer.make_rollout(held_out)
        values = trainer.model(rollout, trainer.args.temperature)[2][:, 0]  # (B,) V(question, image)
    groups = {}  # the same prompt tokens: only the pixels differ
    grids = rollout.image_grid_thw.tolist()
    for i, s in enumerate(held_out):
        groups.setdefault((prompt_text(s["prompt"]), tuple(grids[i])), []).append(i)
    pairs = [(g[0], j) for g in groups.values() for j in g[1:]]
    assert len(pairs) >= 5
    for i, j in pairs:
        assert torch.equal(rollout.query_response[i, : rollout.context_length], rollout.query_response[j, : rollout.context_length])
    differences = torch.stack([(values[i] - values[j]).abs() for i, j in pairs])
    assert differences.min() > 1e-5, differences  # equal pixels give equal values to ~1e-7


def test_a_separate_critic_starts_from_a_reward_model(tmp_path, tiny_model_dir):
    """InstructGPT's initialisation: the reward model's backbone, and its score head as the value head."""
    from reward_models.vlm_reward import VLMRewardModel

    reward_model = VLMRewardModel.from_base(str(tiny_model_dir))
    with torch.no_grad():
        reward_model.head.weight.normal_()
        reward_model.backbone.language_model.norm.weight.add_(0.5)  # a backbone the SFT model does not have
    reward_model.save_pretrained(tmp_path / "rm")
    critic = load_separate_critic(str(tmp_path / "rm"), torch.float32)
    torch.testing.assert_close(critic.head.summary.weight, reward_model.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(critic.head.summary.bias, reward_model.head.bias, rtol=0, atol=0)
    mine, theirs = dict(critic.backbone.named_parameters()), dict(reward_model.backbone.named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert not any(p.requires_grad for p in critic.backbone.visual.parameters())  # its vision tower frozen
