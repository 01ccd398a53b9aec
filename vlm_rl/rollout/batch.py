"""The rollout batch: padded query|response, masks, image and video tensors (and their encoded features), and
selection into micro-batches."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from vlm_rl.models.families import Family, Images, images_of_rows, join_images
from vlm_rl.rollout.generation import first_eos_mask
from vlm_rl.models.vision_features import ImageFeatures, with_encoded_features
from vlm_rl.rollout.micro_batches import RowLengths
from vlm_rl.rollout.videos import VideoBatch


@dataclass
class Rollout:
    """One generated batch of a model of `family`. Queries are left-padded, responses right-padded after their
    first eos."""

    query_response: torch.Tensor  # (B, T_q + T_r)
    attention_mask: torch.Tensor  # (B, T_q + T_r)
    mm_token_type_ids: torch.Tensor | None  # (B, T_q + T_r); the Qwen families' M-RoPE input
    response_mask: torch.Tensor  # (B, T_r) bool
    has_eos: torch.Tensor  # (B,) bool
    pixel_values: torch.Tensor | None  # Qwen: (N_patches, D); LLaVA: (N_images, 3, H, W)
    image_grid_thw: torch.Tensor | None  # (N_images, 3); None for LLaVA
    num_images: list[int]
    context_length: int
    sources: list[str]
    family: Family
    image_features: ImageFeatures | None = None  # the vision tower's output per image, encoded once (vision_features.py)
    videos: VideoBatch | None = None  # the rows' videos (rollout/videos.py); None when no row holds one
    # per row, the index of its prompt among the rollout's distinct prompts (rows of one prompt hold the same prompt
    # tokens, images and videos: a group of num_generations samples), whose forwards then run each prompt once; None:
    # every forward runs each row whole (sharing off, or no prompt repeats on any rank)
    prompt_ids: tuple[int, ...] | None = None
    # per row, what a multi-turn rollout did after the prompt (rollout/multi_turn.py: turns, their rewards and last
    # tokens, tool calls); None for single-turn rollouts. Its response region also holds the observations' tokens,
    # which `response_mask` leaves out (they are attended to, in `attention_mask`)
    trajectories: tuple | None = None

    @classmethod
    def from_generation(
        cls,
        query: dict,
        response_ids: torch.Tensor,
        eos_ids: list[int],
        pad_id: int,
        sources: list[str],
        family: Family,
        image_features: ImageFeatures | None = None,
        video_features: ImageFeatures | None = None,
        rows: torch.Tensor | None = None,
    ) -> Rollout:
        """Cut each response after its first eos (the rest becomes pad, masked out) and join it to its query
        (`encode_prompts`' output for a model of `family`, videos included). `rows` `(B,)`: each response's prompt,
        an index into the rows of `query` (one row per distinct prompt, see `generate_responses`); default: the
        query's rows in order."""
        response_mask, has_eos = first_eos_mask(response_ids, eos_ids)  # (B, T_r), (B,)
        response_ids = response_ids.masked_fill(~response_mask, pad_id)
        token_types = query.get("mm_token_type_ids")
        n = query["input_ids"].shape[0]
        prompts = cls(  # the distinct prompts, no response yet
            query_response=query["input_ids"],
            attention_mask=query["attention_mask"],
            mm_token_type_ids=token_types,
            response_mask=response_mask.new_zeros((n, 0)),
            has_eos=has_eos.new_zeros(n),
            pixel_values=query.get("pixel_values"),
            image_grid_thw=query.get("image_grid_thw"),
            num_images=list(query["num_images"]),
            context_length=query["input_ids"].shape[1],
            sources=[""] * n,
            family=family,
            image_features=image_features,
            videos=VideoBatch.from_query(query, family, video_features),
        )
        if rows is not None:
            prompts = prompts.select(rows)
        return replace(
            prompts,
            query_response=torch.cat([prompts.query_response, response_ids], dim=1),
            attention_mask=torch.cat([prompts.attention_mask, response_mask.to(prompts.attention_mask.dtype)], dim=1),
            mm_token_type_ids=None if token_types is None else torch.cat([prompts.mm_token_type_ids, torch.zeros_like(response_ids)], dim=1),
            response_mask=response_mask,
            has_eos=has_eos,
            sources=list(sources),
            prompt_ids=None if rows is None else tuple(rows.tolist()),
        )

    @classmethod
    def concat(cls, parts: list[Rollout], pad_id: int) -> Rollout:
        """The rows of `parts` (rollouts of one family) in order as one batch: queries left-padded and responses
        right-padded (with `pad_id`, masked out) to the longest; images, videos and their encoded features in row
        order (the features only when every part with images, or videos, has them, from the same towers)."""
        context = max(p.context_length for p in parts)
        width = max(p.response_mask.shape[1] for p in parts)

        def joined(name: str, value: int | bool) -> torch.Tensor:
            """The parts' query|response tensor `name`, each `(b, T_q + T_r)` padded to `(b, context + width)`."""
            pad = [(context - p.context_length, width - p.response_mask.shape[1]) for p in parts]
            return torch.cat([torch.nn.functional.pad(getattr(p, name), sides, value=value) for p, sides in zip(parts, pad)])

        with_images = [p for p in parts if sum(p.num_images)]
        features = [p.image_features for p in with_images]
        images = join_images([image for p in with_images for image in p.per_image()], parts[0].family.image_layout.keys)
        response_mask = [torch.nn.functional.pad(p.response_mask, (0, width - p.response_mask.shape[1]), value=False) for p in parts]
        prompt_ids, offset = [], 0  # each part's prompts keep sharing, numbered after the earlier parts'
        for p in parts:
            own = p.prompt_ids if p.prompt_ids is not None else tuple(range(len(p)))
            prompt_ids += [offset + i for i in own]
            offset += max(own, default=-1) + 1
        return cls(
            query_response=joined("query_response", pad_id),
            attention_mask=joined("attention_mask", 0),
            mm_token_type_ids=None if parts[0].mm_token_type_ids is None else joined("mm_token_type_ids", 0),
            response_mask=torch.cat(response_mask),
            has_eos=torch.cat([p.has_eos for p in parts]),
            pixel_values=images.get("pixel_values"),
            image_grid_thw=images.get("image_grid_thw"),
            num_images=[n for p in parts for n in p.num_images],
            context_length=context,
            sources=[s for p in parts for s in p.sources],
            family=parts[0].family,
            image_features=ImageFeatures.concat(features) if features and None not in features else None,
            videos=VideoBatch.concat([p.videos for p in parts], [len(p) for p in parts]),
            prompt_ids=None if all(p.prompt_ids is None for p in parts) else tuple(prompt_ids),
            trajectories=None if any(p.trajectories is None for p in parts) else tuple(t for p in parts for t in p.trajectories),
        )

    def __len__(self) -> int:
        return self.query_response.shape[0]

    @property
    def responses(self) -> torch.Tensor:  # (B, T_r)
        return self.query_response[:, self.context_length :]

    @property
    def response_lengths(self) -> torch.Tensor:  # (B,)
        """The tokens of each row's response region: the model's, and a multi-turn rollout's observations."""
        return self.attention_mask[:, self.context_length :].sum(dim=1)

    def row_lengths(self) -> RowLengths:
        """Each row's prompt and response tokens, and which rows share a prompt: what micro-batch planning reads."""
        prompt = self.attention_mask[:, : self.context_length].sum(dim=1)  # (B,)
        return RowLengths(prompt=prompt.tolist(), response=self.response_lengths.tolist(), prompt_ids=self.prompt_ids)

    def turn_rewards(self) -> torch.Tensor | None:
        """The environment's reward for each model turn on that turn's last token `(B, T_r)`; None for single-turn."""
        if self.trajectories is None:
            return None
        rewards = torch.zeros(self.response_mask.shape, device=self.query_response.device)
        for row, t in enumerate(self.trajectories):
            for end, reward in zip(t.turn_ends, t.turn_rewards):
                rewards[row, end] += reward
        return rewards

    def images(self) -> Images:
        """The image tensors that are present (`pixel_values`, and the Qwen families' `image_grid_thw`)."""
        tensors = {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}
        return {k: tensors[k] for k in self.family.image_layout.keys if tensors[k] is not None}

    def per_image(self) -> list[Images]:
        """The image tensors of each image, in batch order."""
        return self.family.image_layout.split(self.images()) if sum(self.num_images) else []

    def num_videos(self) -> list[int]:
        """Videos per row."""
        return list(self.videos.counts) if self.videos is not None else [0] * len(self)

    def model_inputs(self, model: torch.nn.Module | None = None, prompts_only: bool = False) -> dict:
        """Keyword arguments for a forward over query|response (over the queries alone with `prompts_only`): the
        positions `generate` used (`Family.position_inputs`), and the images and videos.

        They go in as their encoded features when `model` may use them exactly (its vision tower is one they stand
        for, see `ImageFeatures.usable_by`; images and videos alike), else as `pixel_values` (+ `image_grid_thw`) and
        `pixel_values_videos` (+ `video_grid_thw`)."""
        end = self.context_length if prompts_only else None
        mask = self.attention_mask[:, :end]
        token_types = None if self.mm_token_type_ids is None else self.mm_token_type_ids[:, :end]
        images = self.images() if sum(self.num_images) else {}
        videos = self.videos.tensors if self.videos is not None else {}
        inputs = {
            "input_ids": self.query_response[:, :end],
            "attention_mask": mask,
            **self.family.position_inputs(mask, token_types, images, videos),
            **images,
            **videos,
        }
        if model is None:
            return inputs
        features = {"image": self.image_features, "video": self.videos.features if self.videos is not None else None}
        return with_encoded_features(model, inputs, features)

    def select(self, indices: list[int] | torch.Tensor) -> Rollout:
        """The rows `indices`, with their images' tensors (and encoded features) in the same order."""
        indices = [int(i) for i in indices]
        images, chosen = images_of_rows(self.family.image_layout, self.images(), self.num_images, indices)
        image_features = None if self.image_features is None else self.image_features.select(chosen)  # (for no image too)
        index = torch.tensor(indices, device=self.query_response.device)
        token_types = self.mm_token_type_ids
        return replace(
            self,
            query_response=self.query_response[index],
            attention_mask=self.attention_mask[index],
            mm_token_type_ids=None if token_types is None else token_types[index],
            response_mask=self.response_mask[index],
            has_eos=self.has_eos[index],
            pixel_values=images.get("pixel_values"),
            image_grid_thw=images.get("image_grid_thw"),
            image_features=image_features,
            videos=None if self.videos is None else self.videos.select(indices),
            num_images=[self.num_images[i] for i in indices],
            sources=[self.sources[i] for i in indices],
            prompt_ids=None if self.prompt_ids is None else tuple(self.prompt_ids[i] for i in indices),
            trajectories=None if self.trajectories is None else tuple(self.trajectories[i] for i in indices),
        )

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every row: the prompts' common left padding and the
        response columns after the longest response (a forward over them would compute nothing that is used)."""
        c = self.context_length
        real = self.attention_mask[:, :c].any(dim=0)  # (T_q,)
        lead = int(real.int().argmax()) if bool(real.any()) else 0
        keep = max(int(self.response_lengths.max()), 1) if len(self) else self.response_mask.shape[1]
        keep = min(keep, self.response_mask.shape[1])
        if lead == 0 and keep == self.response_mask.shape[1]:
            return self
        columns = slice(lead, c + keep)
        token_types = self.mm_token_type_ids
        return replace(
            self,
            query_response=self.query_response[:, columns],
            attention_mask=self.attention_mask[:, columns],
            mm_token_type_ids=None if token_types is None else token_types[:, columns],
            response_mask=self.response_mask[:, :keep],
            context_length=c - lead,
        )

    def to(self, device: torch.device | str) -> Rollout:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), (torch.Tensor, ImageFeatures, VideoBatch)) else getattr(self, f.name)
            for f in fields(self)
        }
        return Rollout(**moved)
