"""A learned reward model that sees the image (or the clip): a VLM backbone (any family of ``vlm_rl.models.families``) + a scalar head.

Architecture
------------
``VLMRewardModel`` holds the backbone (``.model``, e.g. the ``Qwen2VLModel`` of a ``Qwen2VLForConditionalGeneration``: vision tower +
language model, *no* LM head: a reward model is not a policy) and ``head``, an fp32 ``nn.Linear(H, 1)``.
A sample is rendered exactly as the policy sees it during PPO::

    chat_template(prompt, add_generation_prompt=True) + response + "<|im_end|>"   # the response ended
    chat_template(prompt, add_generation_prompt=True) + response                  # it was cut off

and its reward is the head applied to the last hidden state of the *last real token* (the ``<|im_end|>``, or
the last response token of a cut-off response). Whether a response ended comes from the reward keyword
``completion_ended`` (one bool per sample: True when it ended with an eos token, False when it was cut off
at the length limit); without it every response counts as ended (e.g. scoring finished responses offline).
That position is read from the attention mask (the highest index whose mask is 1), never from
``token != pad_id``: ``<|endoftext|>`` is both pad and an eos. Batches are right-padded by default (then the
real tokens' positions do not depend on the batch, also for text-only samples), left padding works too
(``padding_side="left"``); ``tests/reward_models/test_vlm_reward.py`` checks both are padding invariant.

The object is a reward (``reward_models.base``) and a module at once:

* ``rm(prompts, completions, images=[[PIL], ...], videos=[[Video], ...], **columns) -> list[float]``: no grad, in
  batches of ``batch_size``, with the multimodal integrity check before every forward (TRL's reward signature);
  ``videos`` (``vlm_rl.data.videos.Video``, as PPO passes them) for a Qwen-family backbone;
* ``rm(input_ids=..., attention_mask=..., ...) -> (B,) tensor``: the differentiable forward used in training
  (dispatched to ``nn.Module.__call__``, so hooks, DDP and accelerate wrappers work as usual).

Saved layout (``save_pretrained(dir)``, atomic: the directory appears whole or not at all)
-----------------------------------------------------------------------------------------
::

    config.json, model.safetensors   the backbone as a ``Qwen2VLModel`` checkpoint (no LM head);
                                     ``AutoModel.from_pretrained(dir)`` loads it
    tokenizer / processor files      ``AutoProcessor.from_pretrained(dir)`` loads them
    reward_head.safetensors          {"weight": (1, H), "bias": (1,)}, fp32
    reward_config.json               the marker ``load_reward(dir)`` looks for, plus metadata

LoRA: with ``use_peft`` the backbone is wrapped by peft during training; ``save_pretrained`` always writes the
adapters *merged* into plain backbone weights, so loading a reward model never needs peft or the base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reward_models.base import Reward, completion_texts
from vlm_rl.atomic import atomic_dir
from vlm_rl.data.prompts import COUNT_KEYS, video_kwargs
from vlm_rl.models.dummy_image import tower_on_every_rank
from vlm_rl.models.families import family_of, images_of_rows
from vlm_rl.rollout.integrity import check_model_inputs
from vlm_rl.models.loading import language_model_lora_config
from vlm_rl.models.vision_features import FeatureLookup, ImageFeatures
from vlm_rl.rollout.micro_batches import RowLengths, by_tokens

REWARD_CONFIG_NAME = "reward_config.json"
REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_MODEL_TYPE = "vlm_reward"
FORMAT_VERSION = 1
IM_END = "<|im_end|>"


class RewardInputError(ValueError):
    """A sample the reward model cannot encode (e.g. longer than max_length); the message names it."""


def _as_messages(prompt: Any, n_images: int, n_videos: int = 0) -> list[dict]:
    """A chat-message prompt as it is; a plain string becomes one user turn with its images, then its videos, first."""
    if isinstance(prompt, str):
        parts = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
        return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]
    if isinstance(prompt, list):
        return prompt
    raise TypeError(f"a prompt must be chat messages or a string, got {type(prompt).__name__}")


def _as_image_list(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # one PIL image


def encode_for_reward(
    processor,
    prompts: Sequence[Any],
    completions: Sequence[str],
    images: Sequence[Any] | None = None,
    padding_side: str = "right",
    max_length: int | None = None,
    sample_names: Sequence[str] | None = None,
    completion_ended: Sequence[bool] | None = None,
    videos: Sequence[Any] | None = None,
) -> dict:
    """Chat template(prompt) + completion (+ ``<|im_end|>`` if it ended) through the processor, padded on ``padding_side``.

    ``completion_ended`` (one bool per sample, default all True): False marks a response cut off at the length
    limit, rendered without the closing ``<|im_end|>``.
    Returns the processor's tensors: ``input_ids, attention_mask (B, T)``, and by family the Qwen families'
    ``mm_token_type_ids (B, T)``, ``pixel_values (N_patches, D)``, ``image_grid_thw (N_images, 3)`` or LLaVA's
    ``pixel_values (N_images, 3, H, W)``; plus ``num_images`` (list per sample). With ``videos`` (one list of
    ``Video`` per sample): ``pixel_values_videos``, ``video_grid_thw`` (Qwen2.5-VL: ``second_per_grid_ts``) and
    ``num_videos``, as ``vlm_rl.data.prompts.encode_prompts`` makes them.
    """
    n = len(completions)
    images = [None] * n if images is None else list(images)
    if len(prompts) != n or len(images) != n:
        raise ValueError(f"got {len(prompts)} prompts, {n} completions and {len(images)} image lists")
    ended = [True] * n if completion_ended is None else [bool(e) for e in completion_ended]
    if len(ended) != n:
        raise ValueError(f"got {len(ended)} completion_ended flags for {n} completions")
    per_sample = [_as_image_list(im) for im in images]
    clips = [_as_image_list(v) for v in (videos if videos is not None else [None] * n)]
    if len(clips) != n:
        raise ValueError(f"got {len(clips)} video lists for {n} completions")
    texts = []
    for prompt, completion, ims, vids, end in zip(prompts, completions, per_sample, clips, ended):
        rendered = processor.apply_chat_template(_as_messages(prompt, len(ims), len(vids)), add_generation_prompt=True, tokenize=False)
        texts.append(rendered + completion + (IM_END if end else ""))
    flat = [im for ims in per_sample for im in ims]
    names = list(sample_names) if sample_names is not None else [f"sample {i}" for i in range(n)]
    video_inputs = video_kwargs(processor, [{"videos": vids, "_source": name} for vids, name in zip(clips, names)])
    batch = dict(
        processor(text=texts, images=flat or None, return_tensors="pt", padding=True, padding_side=padding_side, **video_inputs)
    )
    batch["num_images"] = [len(ims) for ims in per_sample]
    if video_inputs:
        batch["num_videos"] = [len(vids) for vids in clips]
    if max_length is not None:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        too_long = [f"{name} ({k} tokens)" for name, k in zip(names, lengths) if k > max_length]
        if too_long:
            raise RewardInputError(
                f"longer than the reward model's max_length={max_length}: {', '.join(too_long)}; "
                "sequences are never cut (that could cut image tokens): raise max_length or lower max_pixels"
            )
    return batch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, for right or left padding. (B, T) -> (B,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


class VLMRewardModel(nn.Module, Reward):
    """VLM backbone (any family of ``vlm_rl.models.families``) + fp32 scalar head on the last real token (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        processor,
        name: str = "vlm_rm",
        batch_size: int = 8,
        padding_side: str = "right",
        max_length: int | None = None,
        metadata: dict | None = None,
    ):
        super().__init__()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backbone = backbone
        hidden = self.base_backbone.config.text_config.hidden_size
        self.head = nn.Linear(hidden, 1, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.processor = processor
        self.name = name
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.max_length = max_length
        self.metadata = dict(metadata or {})
        # During PPO scoring: the rollout's encoded images, used where this model's tower may (`shared_image_features`)
        self.image_features_source: FeatureLookup | None = None
        # During PPO scoring with max_tokens_per_micro_batch: micro-batches by tokens instead of batch_size (`scoring_by_tokens`)
        self.max_tokens_per_micro_batch: int | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, model_name_or_path: str, dtype: torch.dtype = torch.float32, **kwargs) -> VLMRewardModel:
        """A fresh reward model on the backbone of a VLM checkpoint ('tiny', a directory or a peft adapter)."""
        from vlm_rl.models.loading import load_base_model, load_processor
        from vlm_rl.models.tiny import resolve_model_path

        path = resolve_model_path(model_name_or_path)
        full = load_base_model(path, dtype)
        backbone = full.model  # e.g. Qwen2VLModel or LlavaModel: vision encoder + language model; the LM head is dropped
        del full
        processor = load_processor(path)
        metadata = {"base_model_name_or_path": str(model_name_or_path), **kwargs.pop("metadata", {})}
        return cls(backbone, processor, metadata=metadata, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> VLMRewardModel:
        """Load a directory written by ``save_pretrained``. ``device`` None: the current CUDA device if any, else CPU."""
        from transformers import AutoModel, AutoProcessor

        from vlm_rl.models.families import family_of

        path = Path(path)
        config_path = path / REWARD_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no {REWARD_CONFIG_NAME}; not a reward model written by VLMRewardModel.save_pretrained")
        config = json.loads(config_path.read_text())
        if config.get("reward_model_type") != REWARD_MODEL_TYPE:
            raise ValueError(f"{config_path}: reward_model_type is {config.get('reward_model_type')!r}, expected {REWARD_MODEL_TYPE!r}")
        if int(config.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {config['format_version']} is newer than this code ({FORMAT_VERSION})")
        family_of(json.loads((path / "config.json").read_text()).get("model_type"))  # a supported family, before loading
        backbone = AutoModel.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        processor = AutoProcessor.from_pretrained(path)
        model = cls(
            backbone,
            processor,
            name=config.get("name", "vlm_rm"),
            batch_size=int(config.get("batch_size", 8)),
            padding_side=config.get("padding_side", "right"),
            max_length=config.get("max_length"),
            metadata=config.get("metadata", {}),
        )
        state = load_file(str(path / REWARD_HEAD_FILE))
        if state["weight"].shape != model.head.weight.shape:
            raise ValueError(f"{path / REWARD_HEAD_FILE}: head of shape {tuple(state['weight'].shape)}, backbone wants {tuple(model.head.weight.shape)}")
        model.head.load_state_dict({k: v.float() for k, v in state.items()})
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return model.to(device).eval()

    def enable_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Sequence[str] | None = None) -> None:
        """Wrap the backbone with LoRA adapters on the language model's `target_modules` (default: the family's,
        vlm_rl.models.families); the head stays fully trainable."""
        from peft import get_peft_model

        lora = language_model_lora_config(r, alpha, dropout, target_modules, family_of(self.base_backbone))
        self.backbone = get_peft_model(self.backbone, lora)

    @property
    def base_backbone(self) -> nn.Module:
        """The backbone (e.g. a Qwen2VLModel), also when peft wraps it."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    # What the engines read of a model they shard (TRL's prepare_deepspeed, accelerate's FSDP2 wrap policy).
    @property
    def config(self):
        return self.base_backbone.config

    @property
    def _no_split_modules(self) -> list[str]:
        return list(getattr(self.base_backbone, "_no_split_modules", None) or [])

    def save_pretrained(
        self,
        path: str | os.PathLike,
        extra: dict | None = None,
        extra_files: dict[str, str] | None = None,
        overwrite: bool = True,
    ) -> Path:
        """Write backbone (LoRA merged), processor, head and reward_config.json to ``path`` atomically.

        ``extra`` is merged into reward_config.json's ``metadata``; ``extra_files`` ({name: text}) are written
        into the same directory before it appears (e.g. ``eval_results.json``). ``overwrite`` (the default, as
        for transformers' ``save_pretrained``) replaces an existing ``path`` whole; False refuses a non-empty one.
        """
        path = Path(path)
        backbone = self.backbone
        if hasattr(backbone, "merge_and_unload"):
            import copy

            backbone = copy.deepcopy(backbone).merge_and_unload()  # the training copy keeps its adapters
        with atomic_dir(path, overwrite=overwrite) as tmp:
            backbone.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp / REWARD_HEAD_FILE))
            config = {
                "reward_model_type": REWARD_MODEL_TYPE,
                "format_version": FORMAT_VERSION,
                "name": self.name,
                "architecture": f"{type(self.base_backbone).__name__} backbone + fp32 Linear(hidden, 1) on the last real token",
                "input_format": "chat_template(prompt, add_generation_prompt=True) + response + ('<|im_end|>' if it ended)",
                "hidden_size": self.head.in_features,
                "batch_size": self.batch_size,
                "padding_side": self.padding_side,
                "max_length": self.max_length,
                "metadata": {**self.metadata, **(extra or {})},
            }
            (tmp / REWARD_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return path

    # ------------------------------------------------------------------ forward and scoring

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(self, prompts, completions, images=None, sample_names=None, completion_ended=None, videos=None) -> dict:
        """`encode_for_reward` with this model's processor, padding side and max_length."""
        return encode_for_reward(
            self.processor, prompts, completions, images, self.padding_side, self.max_length, sample_names, completion_ended, videos
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        mm_token_type_ids: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N_patches, D)
        image_grid_thw: torch.Tensor | None = None,  # (N_images, 3)
        num_images: list[int] | None = None,
        sample_names: list[str] | None = None,
        where: str = "reward model forward",
        image_features: ImageFeatures | None = None,
        num_videos: list[int] | None = None,
        **videos: torch.Tensor,  # pixel_values_videos (N_patches, D), video_grid_thw (N_videos, 3)[, second_per_grid_ts]
    ) -> torch.Tensor:
        """Rewards ``(B,)`` in fp32. With ``num_images`` given, the image (and video) tensors are checked against the
        tokens first.

        ``image_features``: the images already encoded by a vision tower of the same weights, instead of ``pixel_values``.
        Positions come from this batch's own inputs (``Family.position_inputs``), for right or left padding."""
        base = self.base_backbone
        images = {} if pixel_values is None or pixel_values.shape[0] == 0 else {"pixel_values": pixel_values}
        if image_grid_thw is not None and image_grid_thw.shape[0] > 0:
            images["image_grid_thw"] = image_grid_thw
        videos = {k: v for k, v in videos.items() if v is not None}
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **family_of(base).position_inputs(attention_mask, mm_token_type_ids, images, videos),
            **videos,
        }
        if image_features is not None:
            inputs["mm_encoder_outputs"] = image_features.encoder_outputs()
        else:
            inputs.update(images)
        if num_images is not None:
            names = list(sample_names) if sample_names is not None else [f"sample {i}" for i in range(input_ids.shape[0])]
            check_model_inputs(base, inputs, num_images, names, where, num_videos)
        if hasattr(base, "rope_deltas"):
            base.rope_deltas = None  # M-RoPE positions come from this batch's own mask and grids
        source = self.image_features_source  # during PPO: every rank's forwards read the rollout's features, or none
        reads_features = source is not None and source.features.usable_by(self)
        with tower_on_every_rank(self, has_images=bool(images), reads_features=reads_features, has_videos=bool(videos)):
            hidden = self.backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        index = last_token_index(attention_mask)  # (B,)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)
        return self.head(last.float()).squeeze(-1)  # (B,)

    def __call__(self, *args, **kwargs):
        """Tensor inputs -> the module forward; ``(prompts, completions, images=..., **columns)`` -> scores."""
        if "input_ids" in kwargs or (args and isinstance(args[0], torch.Tensor)):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.score(*args, **kwargs)

    @torch.no_grad()
    def score(self, prompts, completions, images=None, completion_ended=None, videos=None, **kwargs) -> list[float]:
        """One reward per completion (TRL's reward signature); batched, no grad, integrity-checked.

        ``completion_ended`` (one bool per completion; default all True): False for a response cut off at the
        length limit, which is then scored without a closing ``<|im_end|>``.
        """
        completions = completion_texts(completions)
        n = len(completions)
        if prompts is None or len(prompts) != n:
            raise ValueError(f"{self.name}: got {0 if prompts is None else len(prompts)} prompts for {n} completions")
        images = [None] * n if images is None else list(images)
        videos = [None] * n if videos is None else list(videos)
        ended = [True] * n if completion_ended is None else list(completion_ended)
        if len(ended) != n:
            raise ValueError(f"{self.name}: got {len(ended)} completion_ended flags for {n} completions")
        sources = kwargs.get("_source") or [None] * n
        names = [str(s) if s is not None else f"sample {i}" for i, s in enumerate(sources)]
        was_training = self.training
        self.eval()
        try:
            if self.max_tokens_per_micro_batch is not None:
                return self.score_by_tokens(prompts, completions, images, names, ended, videos)
            scores: list[float] = []
            for start in range(0, n, self.batch_size):
                sl = slice(start, start + self.batch_size)
                scores += self.score_batch(self.encode(prompts[sl], completions[sl], images[sl], names[sl], ended[sl], videos[sl]), names[sl])
            return scores
        finally:
            self.train(was_training)

    def score_by_tokens(self, prompts, completions, images, names, ended, videos) -> list[float]:
        """`score` in micro-batches of at most `max_tokens_per_micro_batch` tokens (padding included): the samples,
        encoded at once, sorted by length fill them (vlm_rl/rollout/micro_batches.py), each without the columns
        that are padding in all its rows."""
        batch = self.encode(prompts, completions, images, names, ended, videos)
        counts = {k: batch.pop(k) for k in COUNT_KEYS if k in batch}  # num_images (and num_videos), per sample
        n = len(counts["num_images"])
        lengths = RowLengths(prompt=[0] * n, response=batch["attention_mask"].sum(dim=1).tolist())
        family = family_of(self.base_backbone)
        layouts = {"num_images": family.image_layout, "num_videos": family.video_layout}
        scores = [0.0] * n
        for rows in by_tokens(range(n), lengths, self.max_tokens_per_micro_batch):
            index = torch.tensor(rows)
            real = batch["attention_mask"][index].any(dim=0).nonzero()[:, 0]  # the columns some row of them uses
            columns = slice(int(real[0]), int(real[-1]) + 1)
            part = {k: batch[k][index][:, columns] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
            for key, per_row in counts.items():  # each kind's tensors of these rows
                layout = layouts[key]
                part.update(images_of_rows(layout, {k: batch[k] for k in layout.keys if k in batch}, per_row, rows)[0])
                part[key] = [per_row[r] for r in rows]
            for r, score in zip(rows, self.score_batch(part, [names[r] for r in rows])):
                scores[r] = score
        return scores

    def score_batch(self, batch: dict, names: list[str]) -> list[float]:
        """The rewards of one encoded batch (`encode`'s output), integrity-checked, with the rollout's image features
        where they may be used."""
        counts = {k: batch.pop(k) for k in COUNT_KEYS if k in batch}  # num_images (and num_videos)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        features = self.shared_features(batch)
        if features is not None:
            batch.pop("pixel_values")
        rewards = self.forward(**batch, **counts, sample_names=names, where=f"reward model {self.name!r}", image_features=features)
        return rewards.float().cpu().tolist()

    def shared_features(self, batch: dict) -> ImageFeatures | None:
        """The rollout's features of this batch's images, when scoring during PPO and all of them are found (and the
        batch holds no video: a forward takes encoded features for every kind or for none)."""
        if self.image_features_source is None or batch.get("pixel_values") is None or batch.get("pixel_values_videos") is not None:
            return None
        layout = family_of(self.base_backbone).image_layout
        return self.image_features_source.find(self, layout.split({k: batch[k] for k in layout.keys}))

    def __repr__(self) -> str:
        return f"VLMRewardModel(name={self.name!r}, hidden_size={self.head.in_features})"


def learned_reward_models(reward: Any) -> list[VLMRewardModel]:
    """The learned reward models inside a reward (a CombinedReward, ScaledReward, or one reward)."""
    if isinstance(reward, VLMRewardModel):
        return [reward]
    inner = getattr(reward, "rewards", None) or ([reward.reward] if hasattr(reward, "reward") else [])
    return [m for r in inner for m in learned_reward_models(r)]


@contextmanager
def scoring_by_tokens(reward_models: Sequence[VLMRewardModel], max_tokens: int | None) -> Iterator[None]:
    """For the duration, `reward_models` score in micro-batches of at most `max_tokens` tokens (None: of their
    `batch_size`)."""
    for model in reward_models:
        model.max_tokens_per_micro_batch = max_tokens
    try:
        yield
    finally:
        for model in reward_models:
            model.max_tokens_per_micro_batch = None


@contextmanager
def shared_image_features(reward_models: Sequence[VLMRewardModel], source: FeatureLookup | None) -> Iterator[None]:
    """For the duration, `reward_models` score the images `source` holds with its features instead of encoding
    them (each image only where it is found and the model may use them exactly, see `FeatureLookup.find`)."""
    for model in reward_models:
        model.image_features_source = source
    try:
        yield
    finally:
        for model in reward_models:
            model.image_features_source = None
