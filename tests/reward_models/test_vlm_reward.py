"""The learned reward model: save/load, image dependence after training, padding invariance, registry, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataclasses import replace

import torch

from reward_models.registry import load_reward, load_rewards
from reward_models.vlm_reward import (
    REWARD_CONFIG_NAME,
    REWARD_HEAD_FILE,
    VLMRewardModel,
    encode_for_reward,
    last_token_index,
)
from vlm_rl.data.formats import load_samples
from vlm_rl.rollout.integrity import MultimodalIntegrityError

N_PAIRS = 16


@pytest.fixture(scope="module")
def pairs_file(synthetic_data_dir, tmp_path_factory) -> Path:
    """The first 16 preference pairs of the synthetic set, image paths made absolute."""
    rows = [json.loads(line) for line in (synthetic_data_dir / "preferences.jsonl").read_text().splitlines()][:N_PAIRS]
    for row in rows:
        row["image"] = str(synthetic_data_dir / row["image"])
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[Path, dict]:
    """A reward model trained briefly with `vlm-rl train-reward` on the 16 pairs (evaluated on the same pairs)."""
    from reward_models.train_reward import main

    out = tmp_path_factory.mktemp("rm") / "rm"
    results = main([
        "--model_name_or_path", str(tiny_model_dir), "--train_data", str(pairs_file), "--eval_data", str(pairs_file),
        "--output_dir", str(out), "--learning_rate", "2e-3", "--max_steps", "40", "--per_device_train_batch_size", "16",
        "--lr_scheduler_type", "constant", "--cache_encodings", "--use_cpu", "--seed", "0",
    ])
    return out, results


@pytest.fixture(scope="module")
def pairs(pairs_file):
    return list(load_samples(pairs_file))


def score(rm, samples, completions=None, images=None):
    completions = completions if completions is not None else [s["chosen"] for s in samples]
    images = images if images is not None else [s["images"] for s in samples]
    return rm([s["prompt"] for s in samples], completions, images=images)


def test_training_writes_model_and_eval_results(trained_dir):
    out, results = trained_dir
    for name in (REWARD_CONFIG_NAME, REWARD_HEAD_FILE, "eval_results.json", "config.json", "model.safetensors", "tokenizer_config.json"):
        assert (out / name).exists(), name
    config = json.loads((out / REWARD_CONFIG_NAME).read_text())
    assert config["reward_model_type"] == "vlm_reward" and config["name"] == "vlm_rm"
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_accuracy"] == results["eval_accuracy"] and saved["eval_pairs"] == N_PAIRS
    assert saved["global_step"] == 40 and "epochs" in saved


def test_trained_model_ranks_chosen_above_rejected(trained_dir, pairs):
    rm = VLMRewardModel.from_pretrained(trained_dir[0])
    chosen = score(rm, pairs)
    rejected = score(rm, pairs, completions=[s["rejected"] for s in pairs])
    wins = sum(c > r for c, r in zip(chosen, rejected))
    assert wins >= 13, f"chosen ranked above rejected on only {wins}/{N_PAIRS} training pairs"
    assert trained_dir[1]["eval_accuracy"] == pytest.approx(wins / N_PAIRS)  # the trainer's eval agrees


def test_score_depends_on_the_image(tiny_model_dir, pairs):
    # A head with unit-scale weights reads the whole last hidden state, so any change the image makes to it shows.
    rm = VLMRewardModel.from_base(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        rm.head.weight.normal_()
    samples = pairs[:4]
    own = score(rm, samples)
    assert score(rm, samples, images=[s["images"] for s in samples]) == own  # same images: same scores
    rotated = [samples[(i + 1) % len(samples)]["images"] for i in range(len(samples))]
    swapped = score(rm, samples, images=rotated)  # same prompts and responses, other images
    assert min(abs(a - b) for a, b in zip(own, swapped)) > 1e-3


def test_score_depends_on_the_clip(tiny_model_dir, tiny_processor, video_data_dir):
    from vlm_rl.data.formats import load_samples, reward_kwargs
    from vlm_rl.models.loading import image_resize

    rm = VLMRewardModel.from_base(str(tiny_model_dir), batch_size=3)
    torch.manual_seed(0)
    with torch.no_grad():
        rm.head.weight.normal_()
    samples = list(load_samples(video_data_dir / "train.jsonl", resize=image_resize(str(tiny_model_dir), tiny_processor)))[:6]
    clips = [bool(s["videos"]) for s in samples]
    assert any(clips) and not all(clips)

    def scores(samples):
        return rm([s["prompt"] for s in samples], [s["answer"] for s in samples], **reward_kwargs(samples))

    own = scores(samples)
    reversed_clips = [{**s, "videos": [replace(v, frames=v.frames.flip(0)) for v in s["videos"]]} for s in samples]  # played backwards
    changed = [abs(a - b) > 1e-4 for a, b in zip(own, scores(reversed_clips))]
    assert changed == clips  # every clip's score moves; the pictures' rows do not


def test_save_load_round_trip_gives_identical_scores(tiny_model_dir, pairs, tmp_path):
    rm = VLMRewardModel.from_base(str(tiny_model_dir))
    with torch.no_grad():
        rm.head.weight.normal_()  # a head that is not the initial one
    before = score(rm, pairs[:6])
    rm.save_pretrained(tmp_path / "rm")
    loaded = VLMRewardModel.from_pretrained(tmp_path / "rm")
    assert score(loaded, pairs[:6]) == before
    assert loaded.name == rm.name and loaded.padding_side == rm.padding_side
    loaded.save_pretrained(tmp_path / "rm")  # overwriting is atomic too
    assert score(VLMRewardModel.from_pretrained(tmp_path / "rm"), pairs[:6]) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_invariance(tiny_model_dir, pairs, padding_side):
    rm = VLMRewardModel.from_base(str(tiny_model_dir), padding_side=padding_side, batch_size=8)
    sizes = {}
    for s in pairs:
        sizes.setdefault(s["images"][0].size, s)
    distinct = list(sizes.values())[:3]  # different image sizes: different numbers of image tokens
    assert len(distinct) >= 2
    target = distinct[0]
    batch = [distinct[1], target, *distinct[2:]]
    completions = ["a much longer response than the others, with many more tokens in it", target["chosen"], "x"][: len(batch)]
    text_only = "What is two plus two?"  # a prompt without an image in the same batch
    alone = rm([target["prompt"]], [target["chosen"]], images=[target["images"]])[0]
    together = rm(
        [s["prompt"] for s in batch] + [text_only],
        completions + ["four"],
        images=[s["images"] for s in batch] + [[]],
    )
    assert together[1] == pytest.approx(alone, abs=1e-5)
    assert together[-1] == pytest.approx(rm([text_only], ["four"], images=[[]])[0], abs=1e-5)
    enc = encode_for_reward(rm.processor, [s["prompt"] for s in batch], completions, [s["images"] for s in batch], padding_side)
    im_end = rm.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    last = last_token_index(enc["attention_mask"])
    assert (enc["input_ids"][torch.arange(len(batch)), last] == im_end).all()  # the head reads <|im_end|>


def test_last_token_index_uses_the_mask_not_the_pad_id():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_images_out_of_step_with_the_prompt_fail_loudly(tiny_model_dir, pairs):
    rm = VLMRewardModel.from_base(str(tiny_model_dir))
    with pytest.raises((MultimodalIntegrityError, ValueError)):
        rm([pairs[0]["prompt"]], ["red"], images=[[]])  # the prompt has an image placeholder, no image given


def test_load_reward_and_load_rewards(trained_dir, pairs):
    out = str(trained_dir[0])
    rm = load_reward(out)
    assert isinstance(rm, VLMRewardModel) and rm.name == "vlm_rm" and rm.__name__ == "vlm_rm"
    combined = load_rewards([out + ":0.5", "exact_match"])
    assert combined.names == ["vlm_rm", "exact_match"] and combined.weights == {"vlm_rm": 0.5, "exact_match": 1.0}
    samples = pairs[:4]
    columns, total = combined.score(
        [s["prompt"] for s in samples], [s["chosen"] for s in samples], images=[s["images"] for s in samples],
        answer=[s["chosen"] for s in samples],
    )
    assert columns["exact_match"] == [1.0] * 4
    assert total == pytest.approx([0.5 * v + 1.0 for v in columns["vlm_rm"]])
    assert columns["vlm_rm"] == pytest.approx(score(rm, samples))


def test_lora_is_saved_merged(tiny_model_dir, pairs, tmp_path):
    rm = VLMRewardModel.from_base(str(tiny_model_dir))
    rm.enable_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in rm.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained-looking adapter (B starts at zero)
    assert not any("visual" in n for n, p in rm.backbone.named_parameters() if "lora_" in n)
    before = score(rm, pairs[:4])
    rm.save_pretrained(tmp_path / "rm")
    assert not (tmp_path / "rm" / "adapter_config.json").exists()
    loaded = VLMRewardModel.from_pretrained(tmp_path / "rm")
    assert not hasattr(loaded.backbone, "peft_config")
    assert score(loaded, pairs[:4]) == pytest.approx(before, abs=1e-5)
    assert hasattr(rm.backbone, "peft_config")  # the training model keeps its adapters


def test_a_cut_off_response_is_shown_without_its_closing_token(tiny_model_dir, tiny_processor, pairs):
    from reward_models.vlm_reward import encode_for_reward

    samples = pairs[:2]
    prompts, images = [s["prompt"] for s in samples], [s["images"] for s in samples]
    batch = encode_for_reward(tiny_processor, prompts, ["red", "red"], images, completion_ended=[True, False])
    im_end = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    last = [int(row[mask.bool()][-1]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert last[0] == im_end and last[1] != im_end
    rm = VLMRewardModel.from_base(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        rm.head.weight.normal_()
    ended = rm(prompts, ["red", "red"], images=images)  # default: every response ended
    assert rm(prompts, ["red", "red"], images=images, completion_ended=[True, True]) == ended
    cut = rm(prompts, ["red", "red"], images=images, completion_ended=[False, False])
    assert all(abs(a - b) > 1e-3 for a, b in zip(ended, cut))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_micro_batches_by_tokens_give_the_batch_size_scores(tiny_model_dir, pairs, padding_side):
    from reward_models.vlm_reward import scoring_by_tokens

    rm = VLMRewardModel.from_base(str(tiny_model_dir), padding_side=padding_side, batch_size=3)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    samples = pairs[:6]
    words = "the red square is on the left of the picture and a blue circle is below it".split()
    completions = [" ".join(words[: n]) for n in (1, 16, 2, 3, 16, 1, 5, 9)]  # a long tail of lengths
    prompts = [s["prompt"] for s in samples[:6]] + ["What is two plus two?", "Name a colour."]  # two text-only samples
    images = [s["images"] for s in samples[:6]] + [[], []]
    rows = []
    hook = rm.backbone.register_forward_pre_hook(lambda m, a, kw: rows.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    fixed = rm(prompts, completions, images=images)
    sizes_fixed, rows[:] = list(rows), []
    with scoring_by_tokens([rm], 200):
        planned = rm(prompts, completions, images=images)
    hook.remove()
    assert rm.max_tokens_per_micro_batch is None  # only for the duration
    assert [b for b, _ in sizes_fixed] == [3, 3, 2]
    assert sum(b for b, _ in rows) == 8 and len({b for b, _ in rows}) > 1 and all(b * t <= 200 for b, t in rows)
    assert planned == pytest.approx(fixed, abs=1e-5)  # to float rounding: other batches, other padding
    assert len(set(planned)) == 8
