"""Supervised fine-tuning (SFT) of a Qwen2-VL on image (or video) + question -> answer demonstrations, with TRL's `SFTTrainer`.

The SFT stage gives PPO a policy that already answers in the right format. It is TRL's `SFTTrainer` with its
vision-language support, nothing home-made:

* Samples (the normal form of `vlm_rl.data.load_samples`: `prompt` = chat messages, `images` = PIL images,
  `completion` = the demonstration text) become a `datasets.Dataset` in TRL's *conversational prompt-completion*
  format: `{"prompt": [user messages], "completion": [{"role": "assistant", ...}], "images": [PIL]}`.
* Conversations with several assistant turns (a prompt that holds earlier assistant answers) are demonstrations
  in every one of them: when any sample has one, every sample becomes TRL's *conversational language modeling*
  format, `{"messages": [...], "images": [PIL]}`, with `assistant_only_loss` (set automatically), which puts the
  loss on each assistant turn (and its `<|im_end|>`) through the chat template's `{% generation %}` markers
  (TRL's training template for the Qwen families), never on system/user turns or image tokens.
* With `images` present, `SFTTrainer` skips its tokenisation pass and uses `DataCollatorForVisionLanguageModeling`,
  which renders the chat template per batch, runs the processor (pixel values, `image_grid_thw`,
  `mm_token_type_ids`) and, for prompt-completion data, sets `labels = -100` on every prompt token
  (`completion_only_loss`, on by default for that format): the loss is on the assistant's answer and its
  `<|im_end|>` only, never on the system/user turn or the image tokens.
* Videos (TRL's collator reads images only): each video is stored as its frames beside the images, and
  `vlm_rl.sft_video.VideoCollator`, TRL's collator, gives them to the processor with the prompts (prompt-completion
  data only).
* LoRA (optional) is a `peft.LoraConfig` on the language model's projections; the vision tower stays frozen.

The output directory loads with `Qwen2VLForConditionalGeneration.from_pretrained(output_dir)` and
`AutoProcessor.from_pretrained(output_dir)`. With LoRA it holds the adapter (transformers loads the base named in
`adapter_config.json` and applies it when peft is installed); `merge_lora=True` (or `merge_lora(adapter, out)`) writes
a plain merged model instead, keeping the adapter in `output_dir/adapter`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from trl import SFTConfig

from vlm_rl.atomic import move_aside, refuse_existing_output, remove, write_run_config
from vlm_rl.data.bad_rows import write_skipped_rows
from vlm_rl.data.options import DataOptions
from vlm_rl.models.families import Family, family_of
from vlm_rl.sft_video import VideoCollator, stored_videos, video_features
logger = logging.getLogger(__name__)
SFT_CONFIG_FILE = "sft_config.yaml"


@dataclass
class VLMSFTConfig(DataOptions, SFTConfig):
    """TRL's `SFTConfig` plus the model, the data (and `DataOptions`) and LoRA: one dataclass, parsed from YAML + CLI
    (vlm_rl/arguments.py, on TRL's parser).

    Defaults that differ from `SFTConfig`: `bf16` is on only where a CUDA GPU supports it (fp32 on CPU);
    TRL's activation checkpointing (on) is set under transformers' current name, `activation_checkpointing`.
    `report_to` keeps transformers' default, "none". Everything else (`learning_rate`, `max_steps`,
    `per_device_train_batch_size`, `max_length`, `completion_only_loss`, ...) is TRL's.
    """

    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "Local Qwen2-VL directory, or 'tiny' (the embedded tiny Qwen2-VL, built once into a cache)."},
    )
    train_data: str = field(
        default="synthetic",
        metadata={
            "help": "Demonstrations (.jsonl/.json/dataset dir, read by vlm_rl.data.load_samples), or 'synthetic' "
            "(the embedded shapes VQA set)."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split of train_data ('synthetic': train or test)."})
    eval_data: str | None = field(default=None, metadata={"help": "Optional evaluation data, same formats."})
    eval_split: str = field(default="test", metadata={"help": "Split of eval_data ('synthetic': train or test)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Full fine-tuning only: keep the vision encoder and its merger frozen."}
    )
    tools: str | None = field(
        default=None,
        metadata={"help": "Tool-use demonstrations: the tools ('zoom' or 'module:function,...', as PPO's --tools) whose "
                  "schemas the chat template shows, as in the PPO rollouts; conversations may hold tool messages."},
    )
    # LoRA (names as in TRL's ModelConfig).
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Language-model modules LoRA adapts, inside the language model only (default: the model family's)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. lm_head)."}
    )
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "CPU intra-op threads (torch.set_num_threads); None leaves torch's default."}
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "With use_peft: write the merged full model to output_dir (the adapter goes to output_dir/adapter)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a non-empty output_dir (it is moved aside, and removed once this run has saved). "
            "Default: refuse it, unless resuming.",
            "aliases": ["--overwrite"],
        },
    )
    # Overridden defaults. TRL turns activation checkpointing on through `gradient_checkpointing`, a name transformers
    # 5.23 deprecates with a warning on every run; here both are None and __post_init__ turns it on under the current
    # name, so the old flag, when a user passes it, still warns and takes effect. HfArgumentParser gives Optional bools
    # a required value; nargs/const make a bare `--bf16` (or `--activation_checkpointing`) mean true, as for any bool.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory. Default: on (TRL's).", "nargs": "?", "const": True},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing.", "nargs": "?", "const": True}
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default: on where a CUDA GPU supports it, off (fp32) on CPU.",
            "nargs": "?",
            "const": True,
        },
    )

    def __post_init__(self):
        self.check_data_options()
        if self.disable_tqdm is None:  # bars only where a terminal shows them: none in a log file or a pipe
            from vlm_rl.quiet import on_a_terminal

            self.disable_tqdm = not on_a_terminal()
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.bf16 is None:
            self.bf16 = (
                not self.fp16
                and not self.use_cpu
                and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported()
            )
        super().__post_init__()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _clean_content(content: Any) -> list[dict[str, Any]] | str:
    """Message content with only the keys the chat template reads; image and video placeholders carry no payload.

    Arrow stores a list of content parts as one struct type, so keys must be uniform-ish and PIL objects must not
    hide inside messages (they live in the `images` and `videos` columns).
    """
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for part in content:
        kind = part.get("type") or ("image" if "image" in part else "video" if "video" in part else "text")
        if kind in ("image", "video"):
            parts.append({"type": kind})
        elif kind == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        else:
            raise ValueError(f"unsupported content part type {kind!r} (only 'image', 'video' and 'text' are)")
    return parts


def _completion_messages(completion: Any) -> list[dict[str, Any]]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": [{"type": "text", "text": completion}]}]
    if isinstance(completion, list):  # already chat messages
        return [{"role": m["role"], "content": _clean_content(m["content"])} for m in completion]
    raise TypeError(f"completion must be a string or chat messages, got {type(completion).__name__}")


def is_multi_turn(sample: dict[str, Any]) -> bool:
    """Whether the sample's prompt holds an earlier assistant turn (a demonstration too)."""
    prompt = sample["prompt"]
    return isinstance(prompt, list) and any(m["role"] == "assistant" for m in prompt)


def to_sft_example(sample: dict[str, Any], whole_conversation: bool = False, with_videos: bool = False) -> dict[str, Any]:
    """One normal-form sample -> TRL's conversational prompt-completion example (+ its images); with
    `whole_conversation`, TRL's conversational language-modeling example, `messages` (for assistant_only_loss);
    `with_videos`: + its videos as frames (`vlm_rl.sft_video.stored_videos`)."""
    completion = sample.get("completion")
    if completion is None or completion == "" or completion == []:
        raise ValueError("SFT needs a demonstration: this sample has no `completion` (response) text")
    prompt = sample["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    messages = [{"role": m["role"], "content": _clean_content(m["content"])} for m in prompt]
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"the prompt must end with a user or tool turn, not {messages[-1]['role']!r}")
    images = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in sample.get("images") or []]
    videos = list(sample.get("videos") or [])
    for kind, items in (("image", images), ("video", videos)):
        n_placeholders = sum(1 for m in messages for p in m["content"] if p["type"] == kind)
        if n_placeholders != len(items):
            raise ValueError(f"{len(items)} {kind}(s) but {n_placeholders} {kind} placeholder(s) in the prompt")
    stored = stored_videos(videos) if with_videos else {}
    if whole_conversation:
        if videos:
            raise ValueError("SFT on conversations with several assistant turns takes no video; give one answer per video sample")
        return {"messages": messages + _completion_messages(completion), "images": images, **stored}
    return {"prompt": messages, "completion": _completion_messages(completion), "images": images, **stored}


def to_sft_dataset(samples: Iterable[dict[str, Any]], whole_conversation: bool = False):
    """Normal-form samples -> `datasets.Dataset` with columns `prompt`, `completion`, `images` (SFTTrainer's input),
    or with `whole_conversation`, `messages` and `images` (see `to_sft_example`).

    Images are stored PNG-encoded in memory (datasets' Image feature) and decoded per batch by the collator; so are
    the frames of videos, in `videos` and `video_metadata` columns when any sample has a video (for `VideoCollator`).
    """
    import datasets

    samples = list(samples)
    with_videos = any(s.get("videos") for s in samples)
    rows = [to_sft_example(s, whole_conversation, with_videos) for s in samples]
    if not rows:
        raise ValueError("no SFT samples")
    if not with_videos:
        return datasets.Dataset.from_list(rows)
    dataset = datasets.Dataset.from_list(rows)
    return dataset.cast(datasets.Features({**dataset.features, **video_features()}))


def _load(config: VLMSFTConfig, spec: str, split: str, resize, limit: int | None = None, processor=None) -> tuple[list[dict[str, Any]], Any]:
    """(the demonstrations of `spec`, the bad rows skipped) after the data check: every problem at once, before
    any model loads (or, with skip_bad_rows, the bad rows left out)."""
    from accelerate import PartialState

    from vlm_rl.data.formats import load_samples  # formats.py is the one loader of every dataset format
    from vlm_rl.data.synthetic import resolve_data_path
    from vlm_rl.data.validate import check_data

    with PartialState().main_process_first():  # rank 0 builds the embedded synthetic set; the others then read it
        path = resolve_data_path(spec, split)
    report = check_data(path, "sft", split=split, column_map=config.column_map, resize=resize, processor=processor)
    bad = report.rows_to_skip(config.skip_bad_rows, config.max_bad_row_fraction)
    samples = load_samples(path, split=split, column_map=config.column_map, resize=resize, skip=bad.sources)
    return (samples[:limit] if limit is not None else list(samples)), bad


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def lora_config_from(config: VLMSFTConfig, family: Family):
    """The `peft.LoraConfig` for `config` on a model of `family` (vlm_rl.models.families), or None without `use_peft`."""
    if not config.use_peft:
        return None
    from vlm_rl.models.loading import language_model_lora_config

    return language_model_lora_config(
        config.lora_r,
        config.lora_alpha,
        config.lora_dropout,
        config.lora_target_modules,
        family,
        task_type="CAUSAL_LM",
        modules_to_save=config.lora_modules_to_save,
        bias="none",
    )


def _load_model(config: VLMSFTConfig):
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(config.model_init_kwargs or {})
    model = create_model_from_path(config.model_name_or_path, **kwargs)
    if config.freeze_vision_tower and not config.use_peft:
        for module in family_of(model).vision_encoder(model):
            module.requires_grad_(False)
    return model


def _resolve_model_path(name_or_path: str) -> str:
    """'tiny' -> the embedded tiny model; local directories become absolute, so that an adapter's
    `base_model_name_or_path` works from any working directory."""
    from accelerate import PartialState

    from vlm_rl.models.loading import require_model

    with PartialState().main_process_first():  # rank 0 builds the embedded tiny model; the others then read it
        name_or_path = require_model(name_or_path)
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a LoRA adapter into its base model and write a plain model + processor directory to `out_dir`."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoProcessor
    from trl.trainer.utils import create_model_from_path

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    model = PeftModel.from_pretrained(create_model_from_path(base), adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The processor saved with the adapter (run_sft saves it there), else the base model's.
    processor_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    AutoProcessor.from_pretrained(processor_src).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def build_trainer(
    config: VLMSFTConfig,
    train_samples: Sequence[dict[str, Any]] | None = None,
    eval_samples: Sequence[dict[str, Any]] | None = None,
    callbacks: list | None = None,
):
    """The configured `trl.SFTTrainer` (model, processor, datasets, LoRA), not yet trained. Its `skipped_rows`
    lists the bad rows skipped (`skip_bad_rows`), which `run_sft` writes beside the model."""
    from transformers import AutoProcessor
    from trl import SFTTrainer

    from vlm_rl.models.loading import image_resize

    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    if not (config.overwrite_output_dir or config.resume_from_checkpoint):
        refuse_existing_output(config.output_dir, "--overwrite_output_dir", also=" (--resume_from_checkpoint to continue it)")
    config.model_name_or_path = _resolve_model_path(config.model_name_or_path)
    processor = AutoProcessor.from_pretrained(config.model_name_or_path)
    tools = None
    if config.tools:  # the template that shows them, saved with the model (PPO then renders the same)
        from transformers import AutoConfig

        from vlm_rl.models.tool_template import use_tool_template
        from vlm_rl.rollout.tools import load_tools, tool_schema

        tools = [tool_schema(t) for t in load_tools(config.tools)]
        use_tool_template(processor, family_of(AutoConfig.from_pretrained(config.model_name_or_path)))
    resize = image_resize(config.model_name_or_path, processor)  # images sized as PPO sizes them
    skipped = []
    if train_samples is None:
        if not config.train_data:
            raise ValueError("train_data (or train_samples) is required")
        train_samples, bad = _load(config, config.train_data, config.train_split, resize, config.max_train_samples, processor)
        skipped.append(bad)
    elif config.max_train_samples is not None:
        train_samples = list(train_samples)[: config.max_train_samples]
    if eval_samples is None and config.eval_data:
        eval_samples, bad = _load(config, config.eval_data, config.eval_split, resize, processor=processor)
        skipped.append(bad)

    # Several assistant turns anywhere: every sample as a whole conversation, the loss on every assistant turn.
    whole = any(is_multi_turn(s) for s in [*train_samples, *(eval_samples or [])])
    if whole:
        config.assistant_only_loss, config.completion_only_loss = True, None
    train_dataset = to_sft_dataset(train_samples, whole)
    eval_dataset = to_sft_dataset(eval_samples, whole) if eval_samples else None
    videos = any("videos" in d.column_names for d in (train_dataset, eval_dataset) if d is not None)
    if videos:
        config.remove_unused_columns = False  # TRL keeps only the columns it knows; the collator reads the videos
    model = _load_model(config)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=lora_config_from(config, family_of(model)),
        callbacks=callbacks,
    )
    if videos:  # TRL's own collator, as TRL configured it, with the videos passed on
        trainer.data_collator = VideoCollator(**{f.name: getattr(trainer.data_collator, f.name) for f in fields(trainer.data_collator)})
    if tools:  # (TRL's vision collator renders conversations without a `tools` column and reads no tool images)
        trainer.data_collator.processor = ShowingTools(processor, tools)
        trainer.data_collator = ToolImagesInline(trainer.data_collator)
    trainer.skipped_rows = skipped
    return trainer


class ShowingTools:
    """A processor whose chat template is always given `tools`: the schemas the PPO rollouts show."""

    def __init__(self, processor, tools: list[dict]):
        self.processor, self.tools = processor, tools

    def apply_chat_template(self, *args, **kwargs):
        return self.processor.apply_chat_template(*args, tools=self.tools, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


class ToolImagesInline:
    """A collator that puts each tool message's images into its content parts (taken from the example's `images`, in
    placeholder order) before TRL's, which fills only the other messages' placeholders from `images`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        return self.collator([_tool_images_inline(e) for e in examples])


def _tool_images_inline(example: dict) -> dict:
    images, kept, messages = list(example["images"]), [], []
    for message in example["messages"]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                image = images.pop(0)
                if message["role"] == "tool":
                    part = {"type": "image", "image": image}
                else:
                    kept.append(image)
            parts.append(part)
        messages.append({**message, "content": parts})
    return {**example, "messages": messages, "images": kept}


def run_sft(
    config: VLMSFTConfig,
    train_samples: Sequence[dict[str, Any]] | None = None,
    eval_samples: Sequence[dict[str, Any]] | None = None,
    callbacks: list | None = None,
) -> Path:
    """Fine-tune `config.model_name_or_path` on the demonstrations; return `config.output_dir`.

    `train_samples` / `eval_samples` (normal-form dicts) override `config.train_data` / `config.eval_data`.
    The output directory holds the model (or LoRA adapter; merged model with `merge_lora`), the processor,
    `sft_config.yaml` (this run's full resolved config) and `sft_metrics.json` (the log history). A non-empty
    output_dir is refused unless `overwrite_output_dir` (it is moved aside, and removed once this run has saved)
    or `resume_from_checkpoint`.
    """
    trainer = build_trainer(config, train_samples, eval_samples, callbacks)
    out = Path(config.output_dir)
    replaced = None
    if trainer.is_world_process_zero():
        if config.overwrite_output_dir and not config.resume_from_checkpoint and (out.exists() or out.is_symlink()):
            replaced = move_aside(out)
            logger.warning(f"--overwrite_output_dir: the previous content of {out} is in {replaced} until this run has saved")
        write_run_config(out / SFT_CONFIG_FILE, config.to_dict())
        write_skipped_rows(out, trainer.skipped_rows)
    trainer.accelerator.wait_for_everyone()
    # transformers' Trainer rewrites the model config's eos/bos/pad ids to the tokenizer's at train() time
    # (align_special_tokens). Keep the base model's config ids in the saved model; the generation config keeps
    # the union of eos ids, which only adds stop tokens.
    text_config = trainer.model.config.get_text_config()
    special_ids = {k: getattr(text_config, k, None) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    for k, v in special_ids.items():
        setattr(text_config, k, v)
    trainer.save_model(str(out))  # model or adapter, + processing_class
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(out)
        with open(out / "sft_metrics.json", "w", encoding="utf-8") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        if config.use_peft and config.merge_lora:
            adapter = out / "adapter"
            adapter.mkdir(exist_ok=True)
            for item in list(out.iterdir()):
                if item.name.startswith("adapter_") or item.name == "README.md":
                    shutil.move(str(item), adapter / item.name)
            trainer.processing_class.save_pretrained(adapter)
            merge_lora(adapter, out)
        if replaced is not None:
            remove(replaced)
    trainer.accelerator.wait_for_everyone()
    return out


def parse_args(argv: Sequence[str] | None = None) -> VLMSFTConfig:
    """CLI + optional `--config file.yaml` (YAML values are defaults the command line overrides); an unknown flag or
    key is a UserError naming it (vlm_rl/arguments.py)."""
    from vlm_rl.arguments import parse_config

    return parse_config(VLMSFTConfig, sys.argv[1:] if argv is None else argv, "vlm-rl sft")


def main(argv: Sequence[str] | None = None) -> Path:
    """`vlm-rl sft ...` / `accelerate launch scripts/sft.py ...`."""
    from vlm_rl.launch import start_process
    from vlm_rl.quiet import disable_progress_bars

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start_process("sft")
    config = parse_args(argv)
    if config.disable_tqdm:
        disable_progress_bars()
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)
    out = run_sft(config)
    print(f"SFT model written to {out}")
    return out


__all__ = [
    "VLMSFTConfig",
    "build_trainer",
    "lora_config_from",
    "main",
    "merge_lora",
    "parse_args",
    "run_sft",
    "to_sft_dataset",
    "to_sft_example",
]
