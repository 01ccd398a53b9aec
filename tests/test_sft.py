"""SFT stage: TRL's SFTTrainer on the tiny Qwen2-VL, loss on the assistant's answer only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_rl.sft import VLMSFTConfig, build_trainer, merge_lora, parse_args, run_sft, to_sft_dataset, to_sft_example


def normal_form(data_dir: Path, split: str = "train", n: int | None = None) -> list[dict]:
    """The normal form of vlm_rl.data.load_samples, built by hand from the synthetic JSONL."""
    rows = [json.loads(line) for line in open(data_dir / f"{split}.jsonl", encoding="utf-8")]
    return [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
            "images": [Image.open(data_dir / r["image"]).convert("RGB")],
            "completion": r["response"],
            "answer": r["answer"],
            "task": r["task"],
        }
        for r in rows[:n]
    ]


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return normal_form(synthetic_data_dir, n=16)


def tiny_config(model_dir, out_dir, **overrides) -> VLMSFTConfig:
    kwargs = dict(
        output_dir=str(out_dir),
        model_name_or_path=str(model_dir),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        activation_checkpointing=False,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return VLMSFTConfig(**kwargs)


def test_config_defaults_cpu_friendly(tmp_path):
    config = VLMSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert config.bf16 is False
    assert config.report_to in ("none", [], ["none"])


def test_to_sft_example_is_trl_prompt_completion(samples):
    example = to_sft_example(samples[0])
    assert set(example) == {"prompt", "completion", "images"}
    assert example["prompt"][-1]["role"] == "user"
    assert example["completion"] == [
        {"role": "assistant", "content": [{"type": "text", "text": samples[0]["completion"]}]}
    ]
    assert len(example["images"]) == 1
    dataset = to_sft_dataset(samples)
    assert len(dataset) == len(samples) and set(dataset.column_names) == {"prompt", "completion", "images"}
    with pytest.raises(ValueError, match="completion"):
        to_sft_example({**samples[0], "completion": None})
    with pytest.raises(ValueError, match="placeholder"):
        to_sft_example({**samples[0], "images": []})


def test_only_assistant_tokens_carry_labels(tiny_model_dir, samples, tmp_path):
    trainer = build_trainer(tiny_config(tiny_model_dir, tmp_path / "out"), samples)
    assert trainer.completion_only_loss
    tokenizer = trainer.processing_class.tokenizer
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"} <= set(batch)
    assistant_start = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i, sample in enumerate(samples[:4]):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i]
        # The prompt ends with "<|im_start|>assistant\n": everything up to there is ignored.
        n = len(assistant_start)
        start = max(j + n for j in range(len(ids) - n + 1) if ids[j : j + n] == assistant_start)
        assert (labels[:start] == -100).all()
        assert (labels[batch["input_ids"][i] == image_pad] == -100).all()
        labelled = labels[labels != -100].tolist()
        # Exactly the answer, its end-of-turn token (so the model learns to stop) and the template's newline.
        assert labelled == ids[start : start + len(labelled)]
        assert tokenizer.decode(labelled) == sample["completion"] + "<|im_end|>\n"
        assert im_end in labelled
    # Padding never carries a label.
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()

    # Prompt tokens do not contribute: the trainer's loss is the mean NLL over the labelled (answer) tokens only,
    # which differs from the NLL over the whole sequence.
    model = trainer.model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    mask = shift_labels != -100
    nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask])
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(trainer_loss, nll, rtol=1e-4, atol=1e-4)
    full = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    full_nll = torch.nn.functional.cross_entropy(shift_logits.flatten(0, 1), full.flatten(), ignore_index=-100)
    assert (full != -100).sum() > 5 * mask.sum()
    assert not torch.allclose(full_nll, trainer_loss, atol=1e-3)


def test_short_run_lowers_loss_and_saves_loadable_model(tiny_model_dir, samples, tmp_path):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    out = run_sft(tiny_config(tiny_model_dir, tmp_path / "sft"), samples)
    assert out == tmp_path / "sft"
    history = json.loads((out / "sft_metrics.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8
    # Measured: 6.04 -> 3.93 over 8 steps (answer tokens only, lr 3e-3).
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(losses[-2:]) / 2 < 0.85 * sum(losses[:2]) / 2, losses

    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    # Weights changed; the config's special ids are the base model's (not rewritten by the Trainer).
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed
    assert model.config.get_text_config().eos_token_id == base.config.get_text_config().eos_token_id

    def as_set(ids):
        return set(ids) if isinstance(ids, list) else {ids}

    assert as_set(base.generation_config.eos_token_id) <= as_set(model.generation_config.eos_token_id)

    # The saved model + processor run end to end: the NLL of a training answer is lower than under the base model.
    sample = samples[0]
    prompt = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt + sample["completion"] + "<|im_end|>"], images=[sample["images"]], return_tensors="pt")
    n_prompt = processor(text=[prompt], images=[sample["images"]], return_tensors="pt")["input_ids"].shape[1]
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        assert model(**enc, labels=labels).loss < base(**enc, labels=labels).loss - 0.5


def test_lora_saves_adapter_and_merges(tiny_model_dir, samples, tmp_path):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    config = tiny_config(tiny_model_dir, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, max_steps=3)
    out = run_sft(config, samples)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert "language_model" in adapter_config["target_modules"]
    # transformers + peft load the adapter on its base from the adapter directory.
    with_adapter = Qwen2VLForConditionalGeneration.from_pretrained(out)
    lora_params = [n for n, _ in with_adapter.named_parameters() if "lora_" in n]
    assert lora_params and not any(".visual." in n for n in lora_params)
    AutoProcessor.from_pretrained(out)

    merged_dir = merge_lora(out, tmp_path / "merged")
    merged = Qwen2VLForConditionalGeneration.from_pretrained(merged_dir)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    processor = AutoProcessor.from_pretrained(merged_dir)
    sample = samples[1]
    text = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[sample["images"]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, with_adapter(**enc).logits, rtol=1e-4, atol=1e-4)

    # merge_lora=True in run_sft: output_dir is the merged model, the adapter is kept in output_dir/adapter.
    config = tiny_config(
        tiny_model_dir, tmp_path / "lora_merged", use_peft=True, lora_r=4, max_steps=1, merge_lora=True
    )
    out = run_sft(config, samples)
    assert (out / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert not any("lora_" in n for n, _ in Qwen2VLForConditionalGeneration.from_pretrained(out).named_parameters())
    AutoProcessor.from_pretrained(out)


def test_parse_args_yaml_and_cli(tmp_path):
    config_file = Path(__file__).resolve().parents[1] / "configs" / "sft_tiny.yaml"
    config = parse_args(["--config", str(config_file), "--output_dir", str(tmp_path / "o"), "--max_steps", "3"])
    assert isinstance(config, VLMSFTConfig)
    assert config.max_steps == 3 and config.output_dir == str(tmp_path / "o")
    assert config.bf16 is False and config.train_data and config.model_name_or_path
    argv = ["--model_name_or_path", "m", "--train_data", "t.jsonl", "--output_dir", str(tmp_path)]
    argv += ["--use_peft", "--lora_r", "8"]
    config = parse_args(argv)
    assert config.use_peft and config.lora_r == 8 and config.report_to in ("none", [], ["none"])


def test_run_sft_reads_train_data_with_load_samples(tiny_model_dir, synthetic_data_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    train_data = str(synthetic_data_dir / "train.jsonl")
    config = tiny_config(
        tiny_model_dir, tmp_path / "from_file", train_data=train_data, max_train_samples=8, max_steps=2
    )
    out = run_sft(config)
    assert Qwen2VLForConditionalGeneration.from_pretrained(out) is not None
    history = json.loads((out / "sft_metrics.json").read_text())
    assert history[-1]["step"] == 2


def test_every_assistant_turn_of_a_conversation_is_a_target(tiny_model_dir, samples, tmp_path):
    """A 3-turn LLaVA conversation (tests/data/fixtures/formats/llava_multi_turn.json): each of the three answers,
    with its <|im_end|>, is supervised (TRL's assistant_only_loss); no system, user or image token is."""
    from vlm_rl.data.formats import load_samples

    conversation = list(load_samples(Path(__file__).parent / "data" / "fixtures" / "formats" / "llava_multi_turn.json"))
    trainer = build_trainer(tiny_config(tiny_model_dir, tmp_path / "out"), conversation + samples[:1])
    assert trainer.args.assistant_only_loss and set(trainer.train_dataset.column_names) == {"messages", "images"}
    tokenizer = trainer.processing_class.tokenizer
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assistant_start = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    n = len(assistant_start)
    starts = [j + n for j in range(len(ids) - n + 1) if ids[j : j + n] == assistant_start]
    answers = ["red", "a square", "in the middle"]
    assert len(starts) == 3
    supervised_per_turn, spans = [], []
    for start, answer in zip(starts, answers):
        length = len(tokenizer.encode(answer + "<|im_end|>\n", add_special_tokens=False))
        spans.append(range(start, start + length))
        supervised_per_turn.append(sum(labels[k] != -100 for k in spans[-1]))
        assert tokenizer.decode(ids[start : start + length]) == answer + "<|im_end|>\n"
        assert all(labels[k] == ids[k] for k in spans[-1])
    assert supervised_per_turn == [len(tokenizer.encode(a + "<|im_end|>\n", add_special_tokens=False)) for a in answers]
    assert supervised_per_turn == [3, 4, 11]  # the tiny tokenizer's pieces of each answer, <|im_end|> and "\n"
    assert sum(label != -100 for label in labels) == sum(supervised_per_turn)  # nothing outside the answers
    # The single-turn sample beside it keeps its one answer supervised, as a prompt-completion pair would.
    single = batch["labels"][1][batch["labels"][1] != -100].tolist()
    assert tokenizer.decode(single) == samples[0]["completion"] + "<|im_end|>\n"


def test_tool_use_demonstrations_train_on_the_models_turns_with_the_tools_shown(tiny_model_dir, tmp_path):
    """`--tools zoom` on make-data --tasks zoom's sft.jsonl: the template shows the zoom schema as the PPO rollouts do,
    the tool's zoomed image is an image of the conversation (after the prompt's), and only the model's turns (the tool
    call, the answer) carry labels; the tool response and its image tokens do not."""
    from vlm_rl.data.formats import load_samples
    from vlm_rl.data.zoom_task import make_zoom_data

    data = make_zoom_data(tmp_path / "zoom", n=10, seed=0)
    traces = list(load_samples(data / "sft.jsonl"))
    trainer = build_trainer(tiny_config(tiny_model_dir, tmp_path / "out", tools="zoom"), traces[:2])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokenizer = trainer.processing_class.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = tokenizer.decode(ids)
    assert '"name": "zoom"' in text.split("<|im_end|>")[0]  # the schema, in the system turn
    assert batch["image_grid_thw"].shape[0] == 2 and "<tool_response>\n<|vision_start|><|image_pad|>" in text
    call, answer = traces[0]["prompt"][1]["content"][0]["text"], traces[0]["completion"]
    assert tokenizer.decode(ids[labels != -100]) == f"{call}<|im_end|>\n{answer}<|im_end|>\n"
