"""Building PPOTrainers on the tiny model for the trainer tests, and rewards with known behaviour."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from reward_models.registry import load_rewards
from vlm_rl.training.config import PPOConfig
from vlm_rl.models.critic import load_critic
from vlm_rl.data.formats import load_samples
from vlm_rl.models.loading import load_policy_and_reference, load_processor
from vlm_rl.training.trainer import PPOTrainer


def completion_length(prompts, completions, **kwargs):
    """Characters in the completion: varies across samples, and the tiny model can learn to raise or lower it."""
    return [float(len(c)) for c in completions]


def negative_completion_length(prompts, completions, **kwargs):
    return [-float(len(c)) for c in completions]


def never_scores(prompts, completions, **kwargs):
    return [None] * len(completions)


def unscored_on_rank_1(prompts, completions, **kwargs):
    """`completion_length` on every rank of a launch but rank 1, which it cannot score at all (None for every sample)."""
    return [None] * len(completions) if os.environ.get("RANK") == "1" else completion_length(prompts, completions)


def colour_questions_only(prompts, completions, task, **kwargs):
    """0, 1, 0, 1, ... by position in the batch on colour questions, 0 on every other question, whatever the responses:
    in groups of an even size, exactly the colour questions' groups carry a signal."""
    return [float(i % 2) if t == "colour" else 0.0 for i, t in enumerate(task)]


def answer_is_red(prompts, completions, answer, **kwargs):
    """1 for a red shape, 0 otherwise, whatever the response: a reward only a critic that sees the image can predict."""
    return [float(a == "red") for a in answer]


def make_config(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> PPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        model_name_or_path=str(model_dir),
        train_data=str(data_dir / "train.jsonl"),
        use_cpu=True,
        report_to="none",
        seed=0,
        max_new_tokens=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=1,
        local_rollout_forward_batch_size=8,
        num_ppo_epochs=1,
        learning_rate=1e-3,
        total_episodes=16,
        save_steps=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def make_trainer(tmp_path: Path, model_dir: Path, data_dir: Path, reward=("exact_match",), **overrides) -> PPOTrainer:
    config = make_config(tmp_path, model_dir, data_dir, **overrides)
    policy, reference = load_policy_and_reference(config)
    critic = load_critic(config, policy, config.model_name_or_path)
    return PPOTrainer(
        args=config,
        processing_class=load_processor(config.model_name_or_path),
        model=policy,
        ref_model=reference,
        reward=load_rewards(list(reward)),
        train_dataset=load_samples(config.train_data),
        critic=critic,
    )


def start(trainer: PPOTrainer) -> None:
    """The part of train() that prepares the model and optimizer, for tests that drive one iteration by hand."""
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.num_total_batches)
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped.eval()


def rollout_and_old(trainer: PPOTrainer, iteration: int = 0, seed: int = 0):
    """Steps 1-5 of one iteration, from a fixed sampling seed: (samples, rollout, old)."""
    torch.manual_seed(seed)
    samples = trainer.batch_samples(iteration)
    rollout = trainer.make_rollout(samples)
    scored = trainer.score(rollout, samples)
    return samples, rollout, {**scored, **trainer.advantages(rollout, scored)}


def log_history(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "trainer_state.json").read_text())["log_history"]


def sampled_lengths(trainer: PPOTrainer) -> float:
    """Mean characters per completion the trainer's policy samples for the first 16 prompts (fixed seed)."""
    torch.manual_seed(0)
    texts = []
    for iteration in (0, 1):
        rollout = trainer.make_rollout(trainer.batch_samples(iteration))
        texts += trainer.processor.batch_decode(rollout.responses, skip_special_tokens=True)
    return statistics.mean(len(t) for t in texts)


def check_resume_reproduces_the_run(tmp_path: Path, model_dir: Path, data_dir: Path, reward, **settings) -> list[dict]:
    """Train a 4-iteration run in tmp_path/a (a checkpoint every iteration), resume it from checkpoint-2 in
    tmp_path/b, and check that the resumed run logs iterations 3-4 and ends with the weights of the uninterrupted
    one. Returns the uninterrupted run's log history."""
    settings = {**settings, "save_steps": 1, "save_total_limit": None}
    make_trainer(tmp_path / "a", model_dir, data_dir, reward=reward, **settings).train()
    history = log_history(tmp_path / "a" / "run")
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    check_resumed_run(tmp_path / "a" / "run", 2, tmp_path / "b", model_dir, data_dir, reward, **settings)
    return history


def check_resumed_run(run: Path, at: int, where: Path, model_dir: Path, data_dir: Path, reward, **settings) -> None:
    """Resume the finished run in `run` from its checkpoint-`at` in `where` and check that the resumed run logs
    every later iteration as `run` did and ends with its weights."""
    history = log_history(run)
    make_trainer(where, model_dir, data_dir, reward=reward, **settings).train(resume_from_checkpoint=str(run / f"checkpoint-{at}"))
    resumed_history = log_history(where / "run")
    assert [h["step"] for h in resumed_history] == [h["step"] for h in history]
    for want, got in zip(history[at:], resumed_history[at:]):
        for name, value in want.items():
            if name != "eps":
                assert got[name] == pytest.approx(value, abs=1e-6, rel=1e-6), (want["step"], name)
    final = parameters(Qwen2VLForConditionalGeneration.from_pretrained(run))
    resumed_final = parameters(Qwen2VLForConditionalGeneration.from_pretrained(where / "run"))
    for name, value in final.items():
        assert torch.allclose(value, resumed_final[name], atol=1e-6), name


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def record_gradients(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    """A dict that receives the (clipped) gradients each optimiser step of `trainer` steps with, from now on."""
    grads: dict[str, torch.Tensor] = {}
    original_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads


def make_sft_adapter(model_dir: Path, out: Path) -> Path:
    """A saved LoRA adapter on `model_dir` whose weights change the model (B != 0), as an SFT run leaves one."""
    from peft import get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    from vlm_rl.models.families import get_family
    from vlm_rl.models.loading import language_model_lora_config

    torch.manual_seed(0)
    sft = get_peft_model(Qwen2VLForConditionalGeneration.from_pretrained(model_dir), language_model_lora_config(4, 8, 0.0, ["q_proj", "v_proj"], get_family("qwen2_vl"), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sft.save_pretrained(out)
    return out
