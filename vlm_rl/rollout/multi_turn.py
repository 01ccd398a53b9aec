"""Multi-turn rollouts: the model turns, the environment answers (tool output as text and images), until the episode
is done, `max_turns` model turns were taken or the trajectory reaches `max_total_tokens`.

A trajectory is one token sequence, the prompt then the response region: the model's tokens exactly as it sampled
them, and between its turns the observation tokens (the chat template around the tool's answer and the answer's
text and image tokens, as the template renders them; TRL's `_get_tool_suffix_ids` approach: what the template adds
after a finished assistant turn). `response_mask` is True on the model's tokens only: observations carry no policy
loss, KL, advantage or value target. Each image an observation brings becomes an image of the sample (its pixels,
grid and image tokens, `mm_token_type_ids` marking them), so every forward recomputes M-RoPE positions over the
whole text-image-text-image sequence, and the integrity checks count the images of the whole trajectory; each such
image is encoded once (`encode`) and its features read by every later forward.

Every turn is one batched `generate` over the samples still running (left-padded, the explicit generation config).
With several processes every rank calls `generate` as many times as the rank that needs most turns: a rank whose
samples are all done runs the turn on a copy of one of them and discards it, so sharded engines stay in step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig, PreTrainedModel

from vlm_rl.models.families import Family, Images, join_images
from vlm_rl.models.vision_features import ImageFeatures
from vlm_rl.rollout.batch import Rollout
from vlm_rl.models.tool_template import use_tool_template
from vlm_rl.rollout.environment import Step, as_step, environment_factory, tool_schemas
from vlm_rl.rollout.generation import first_eos_mask, generate_responses
from vlm_rl.rollout.integrity import check_model_inputs


@dataclass
class Trajectory:
    """What happened after a sample's prompt: for the rewards, the metrics and the evaluation report."""

    messages: list[dict] = field(default_factory=list)  # assistant turns (text) and observations (with their images)
    turn_ends: list[int] = field(default_factory=list)  # per model turn, the response column of its last token
    turn_rewards: list[float] = field(default_factory=list)  # per model turn, the environment's reward
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False  # ended by max_total_tokens, max_turns or max_new_tokens, not by the environment

    @property
    def turns(self) -> int:
        return len(self.turn_ends)

    @property
    def answer(self) -> str:
        """The text of the last model turn (what rewards score)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


@dataclass(frozen=True)
class MultiTurnLimits:
    max_turns: int
    max_total_tokens: int  # tokens after the prompt: model turns and observations (images' tokens included)


@dataclass(frozen=True)
class MultiTurn:
    """What a multi-turn rollout needs besides the model: environments, the tools' schemas, the limits."""

    make_environment: Callable[[], object]
    tools: list[dict] | None
    limits: MultiTurnLimits


def setup_multi_turn(processor, family: Family, tools: str | None, environment: str | None, max_turns: int, max_total_tokens: int) -> MultiTurn | None:
    """The multi-turn setting of `--tools`/`--environment` (None: single-turn rollouts); a processor whose template
    shows no tools gets the family's tool template (models/tool_template.py)."""
    factory = environment_factory(tools, environment)
    if factory is None:
        return None
    schemas = tool_schemas(factory())
    if schemas:
        use_tool_template(processor, family)
    return MultiTurn(factory, schemas, MultiTurnLimits(max_turns, max_total_tokens))


@dataclass
class _Episode:
    """One sample's sequence as it grows."""

    ids: list[int]  # prompt then response tokens, unpadded
    token_types: list[int]  # mm_token_type_ids of those tokens
    prompt_length: int
    images: list[Images]  # one dict of image tensors per image, prompt's first
    features: list[ImageFeatures] | None  # per image, its encoded features (None: every forward encodes pixels)
    environment: object
    name: str
    policy: list[bool] = field(default_factory=list)  # per response token: written by the model
    trajectory: Trajectory = field(default_factory=Trajectory)
    done: bool = False

    @property
    def response_length(self) -> int:
        return len(self.ids) - self.prompt_length


def observation_messages(observation: list[dict] | str | None) -> list[dict]:
    """A Step's observation as chat messages (a string is one user message)."""
    if not observation:
        return []
    if isinstance(observation, str):
        return [{"role": "user", "content": [{"type": "text", "text": observation}]}]
    return list(observation)


def message_images(messages: list[dict]) -> list:
    """The images of `messages`' content parts, in order."""
    return [p["image"] for m in messages if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"]


def observation_text(processor, messages: list[dict], tools: list[dict] | None) -> str:
    """The text the chat template puts after a finished assistant turn (up to and including its end-of-turn token)
    for `messages`, up to the next assistant turn's header: the difference between a conversation rendered with them
    and without, cut at the end of the assistant turn."""
    dummy = [{"role": "user", "content": [{"type": "text", "text": "-"}]}, {"role": "assistant", "content": [{"type": "text", "text": "-"}]}]
    before = processor.apply_chat_template(dummy, tools=tools, tokenize=False)
    after = processor.apply_chat_template(dummy + messages, tools=tools, add_generation_prompt=True, tokenize=False)
    end = processor.tokenizer.eos_token
    cut = before.rindex(end) + len(end)
    if after[:cut] != before[:cut]:
        raise ValueError("the chat template renders an earlier turn differently once the observation follows (not prefix-preserving)")
    return after[cut:]


def encode_observation(processor, messages: list[dict], tools: list[dict] | None) -> dict:
    """The observation's tokens `input_ids (1, T_o)`, `mm_token_type_ids` and its images' tensors (image pads
    expanded by the processor, as in the prompt)."""
    images = message_images(messages)
    out = processor(text=[observation_text(processor, messages, tools)], images=images or None, return_tensors="pt")
    return dict(out)


def _split_images(family: Family, encoded: dict) -> list[Images]:
    images = {k: encoded[k] for k in family.image_layout.keys if encoded.get(k) is not None}
    return family.image_layout.split(images) if images else []


def _token_types(encoded: dict, row: int, mask: torch.Tensor) -> list[int]:
    types = encoded.get("mm_token_type_ids")
    return [0] * int(mask.sum()) if types is None else types[row][mask].tolist()


def _joined_features(base: ImageFeatures | None, episodes: list[_Episode]) -> ImageFeatures | None:
    """The features of the episodes' images in row order, standing for `base`'s towers (also for no image: then every
    rank reads features, or none does); None where forwards read pixels."""
    if base is None:
        return None
    return ImageFeatures.concat([base.select([])] + [f for e in episodes for f in e.features])


def _batch(episodes: list[_Episode], family: Family, pad_id: int, device: torch.device, base: ImageFeatures | None) -> tuple[dict, ImageFeatures | None, list[int]]:
    """The episodes' sequences left-padded for `generate`, their images' tensors (and features) in row order."""
    flip = lambda rows, value: pad_sequence([torch.tensor(r[::-1]) for r in rows], batch_first=True, padding_value=value).flip(1)  # noqa: E731
    ids = flip([e.ids for e in episodes], pad_id)
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": flip([[1] * len(e.ids) for e in episodes], 0).to(device),
        "mm_token_type_ids": flip([e.token_types for e in episodes], 0).to(device),
    }
    images = [image for e in episodes for image in e.images]
    inputs.update({k: v.to(device) for k, v in join_images(images, family.image_layout.keys).items()})
    return inputs, _joined_features(base, episodes), [len(e.images) for e in episodes]


def multi_turn_rollout(
    model: PreTrainedModel,
    processor,
    samples: list[dict],
    query: dict,
    make_environment: Callable[[], object],
    generation_config: GenerationConfig,
    limits: MultiTurnLimits,
    *,
    family: Family,
    eos_ids: list[int],
    pad_id: int,
    tools: list[dict] | None = None,
    encode: Callable[[Images], ImageFeatures | None] | None = None,
    synced_gpus: bool = False,
    seed: int | None = None,
    any_over_ranks: Callable[[bool], bool] = bool,
) -> Rollout:
    """Roll out `samples` (their prompts encoded in `query`, `encode_prompts`' output with the same `tools`) for up to
    `limits.max_turns` model turns each: a `Rollout` (vlm_rl.rollout.batch) whose response region holds the model's
    and the observations' tokens, and per sample its `Trajectory` (`Rollout.trajectories`).

    `encode`: each new batch of images' tensors -> their features (None: forwards read pixels); called every turn on
    every rank (with {} when a rank has no new image), as the vision tower must run alike on every rank.
    `any_over_ranks`: whether any process still has a running sample (one collective per turn, on every rank)."""
    device = query["input_ids"].device
    prompt_images = {k: query[k] for k in family.image_layout.keys if query.get(k) is not None}
    per_image = family.image_layout.split(prompt_images) if prompt_images else []
    features = encode(prompt_images) if encode is not None else None
    episodes, start = [], 0
    for i, sample in enumerate(samples):
        mask = query["attention_mask"][i].bool()
        n = query["num_images"][i]
        environment = make_environment()
        environment.reset(sample)
        episodes.append(
            _Episode(
                ids=query["input_ids"][i][mask].tolist(),
                token_types=_token_types(query, i, mask),
                prompt_length=int(mask.sum()),
                images=per_image[start : start + n],
                features=None if features is None else [features.select([j]) for j in range(start, start + n)],
                environment=environment,
                name=sample.get("_source", f"sample {i}"),
            )
        )
        start += n
    for turn in range(limits.max_turns):
        running = [e for e in episodes if not e.done]
        if not any_over_ranks(bool(running)):
            break
        batch = running or episodes[:1]  # a rank with nothing left runs the turn on a copy and drops it
        inputs, batch_features, num_images = _batch(batch, family, pad_id, device, features)
        check_model_inputs(model, inputs, num_images, [e.name for e in batch], f"rollout generate (turn {turn + 1})")
        turn_seed = None if seed is None else seed + turn
        responses = generate_responses(model, inputs, generation_config, synced_gpus=synced_gpus, image_features=batch_features, seed=turn_seed)
        mask, has_eos = first_eos_mask(responses, eos_ids)  # (b, T_r), (b,)
        new_images: list[tuple[_Episode, list[Images]]] = []
        for e, row, m, ended in zip(running, responses, mask, has_eos.tolist()):
            observation = _take_turn(e, row[m].tolist(), ended, turn, limits, processor, tools, family)
            if observation:
                new_images.append((e, observation))
        if encode is not None:
            images = [image for _, obs in new_images for image in obs]
            joined = join_images(images, family.image_layout.keys)
            encoded = encode({k: v.to(device) for k, v in joined.items()})
            k = 0
            for e, obs in new_images:
                if e.features is not None:
                    e.features += [encoded.select([j]) for j in range(k, k + len(obs))]
                k += len(obs)
    for e in episodes:
        if not e.done:  # max_turns reached with the environment still expecting a turn
            e.trajectory.truncated = e.done = True
    return _as_rollout(episodes, query, family, pad_id, features)


def _take_turn(e: _Episode, tokens: list[int], ended: bool, turn: int, limits: MultiTurnLimits, processor, tools, family: Family) -> list[Images]:
    """Append one model turn to `e`, step its environment, append the observation if the episode goes on. Returns
    the observation's images (one dict of tensors each)."""
    t = e.trajectory
    budget = limits.max_total_tokens - e.response_length
    if len(tokens) > budget:
        tokens, ended = tokens[:budget], False
    e.ids += tokens
    e.token_types += [0] * len(tokens)
    e.policy += [True] * len(tokens)
    t.turn_ends.append(e.response_length - 1)
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    t.messages.append({"role": "assistant", "content": text})
    if not ended:  # cut by max_new_tokens or max_total_tokens: the turn is incomplete, the environment not asked
        t.turn_rewards.append(0.0)
        t.truncated = e.done = True
        return []
    step: Step = as_step(e.environment.step(text))
    t.turn_rewards.append(float(step.reward))
    t.tool_calls += step.tool_calls
    t.tool_errors += step.tool_errors
    messages = observation_messages(step.observation)
    if step.done or not messages:
        e.done = True
        return []
    if turn + 1 >= limits.max_turns:
        t.truncated = e.done = True
        return []
    encoded = encode_observation(processor, messages, tools)
    ids = encoded["input_ids"][0]
    if len(ids) + 1 > limits.max_total_tokens - e.response_length:  # no room left for the observation and a turn
        t.truncated = e.done = True
        return []
    t.messages += messages
    e.ids += ids.tolist()
    e.token_types += _token_types(encoded, 0, torch.ones_like(ids, dtype=torch.bool))
    e.policy += [False] * len(ids)
    images = _split_images(family, encoded)
    e.images += images
    return images


def _as_rollout(episodes: list[_Episode], query: dict, family: Family, pad_id: int, base: ImageFeatures | None) -> Rollout:
    """The episodes as one batch: prompts left-padded (as encoded), responses right-padded after their last token."""
    c = query["input_ids"].shape[1]
    width = max(e.response_length for e in episodes)
    device = query["input_ids"].device

    def right(rows: list[list], value) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)

    responses = right([e.ids[e.prompt_length :] for e in episodes], pad_id)  # (B, T_r)
    real = right([[1] * e.response_length for e in episodes], 0)  # (B, T_r)
    types = right([e.token_types[e.prompt_length :] for e in episodes], 0)
    prompt_types = query.get("mm_token_type_ids")
    images = [image for e in episodes for image in e.images]
    joined = join_images(images, family.image_layout.keys)
    return Rollout(
        query_response=torch.cat([query["input_ids"], responses], dim=1),
        attention_mask=torch.cat([query["attention_mask"], real.to(query["attention_mask"].dtype)], dim=1),
        mm_token_type_ids=None if prompt_types is None else torch.cat([prompt_types, types.to(prompt_types.dtype)], dim=1),
        response_mask=right([e.policy for e in episodes], False),
        has_eos=torch.tensor([not e.trajectory.truncated for e in episodes], device=device),
        pixel_values=joined.get("pixel_values"),
        image_grid_thw=joined.get("image_grid_thw"),
        num_images=[len(e.images) for e in episodes],
        context_length=c,
        sources=[e.name for e in episodes],
        family=family,
        image_features=_joined_features(base, episodes),
        trajectories=tuple(e.trajectory for e in episodes),
    )
