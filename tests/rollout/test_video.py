"""The pitfall tests of images, again with videos, on every family that takes video: padding invariance, M-RoPE
positions across generate and forward (each family's temporal ids), prompts never cut through their video tokens,
sampled video tokens suppressed, the integrity checks, selection, and exact reuse of the encoded videos in a PPO
iteration. LLaVA takes no video and refuses video rows by name before any model loads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText

import test_families as family_tests
import test_generation as generation_tests
import test_logprobs as logprob_tests
import test_prefix as prefix_tests
import test_vision_reuse as reuse_tests
from trainer_helpers import make_config
from vlm_rl.data.errors import DataError
from vlm_rl.data.formats import load_samples
from vlm_rl.data.prompts import PromptTooLongError, drop_long_prompts, encode_prompts, model_inputs, prompt_lengths
from vlm_rl.data.videos import VideoRef, open_video
from vlm_rl.models.critic import Critic, PolicyAndValue
from vlm_rl.models.families import get_family
from vlm_rl.models.loading import image_resize, load_processor
from vlm_rl.models.value_head import ValueHead
from vlm_rl.models.vision_features import encode_images, encode_videos, with_encoded_features
from vlm_rl.rollout.batch import Rollout
from vlm_rl.rollout.generation import eos_token_ids, generate_responses, make_generation_config, pad_token_id
from vlm_rl.rollout.integrity import MultimodalIntegrityError, check_model_inputs
from vlm_rl.rollout.logprobs import response_logprobs

VIDEO_FAMILIES = pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])


@pytest.fixture()
def model_dir(family, family_dirs):
    return family_dirs(family)


@pytest.fixture()
def processor(model_dir):
    return load_processor(str(model_dir))


@pytest.fixture()
def model(model_dir):
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


@pytest.fixture()
def samples(model_dir, processor, video_data_dir) -> list[dict]:
    """[a clip at 4 fps (a frame list read with sample_fps 4), a clip and a picture in one prompt, a text-only
    prompt, an image row, a clip row, another clip row]: prompts of different lengths, every kind of row."""
    rows = list(load_samples(video_data_dir / "train.jsonl", resize=image_resize(str(model_dir), processor)))
    clips = [r for r in rows if r["videos"]]
    pictures = [r for r in rows if r["images"]]
    resize = image_resize(str(model_dir), processor).video
    frames = "frames/" + clips[0]["videos"][0].name.split("/")[-1].removesuffix(".mp4")  # the same clip's frame folder
    fast = open_video(VideoRef(frames, {"sample_fps": 4}), video_data_dir, "fast", resize)
    question = {"type": "text", "text": "Which way does it move, and what colour is the picture?"}
    mixed = {**clips[1], "prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, question]}],
             "images": pictures[0]["images"], "_source": "clip+picture"}
    text_only = {**pictures[1], "prompt": [{"role": "user", "content": "Say a colour."}], "images": [], "videos": [], "_source": "text"}
    return [{**clips[0], "videos": [fast], "_source": "fast clip"}, mixed, text_only, pictures[2], clips[2], clips[3]]


@VIDEO_FAMILIES
def test_a_clips_logprobs_values_and_advantages_do_not_depend_on_its_batch(family, model, processor, samples):
    head = ValueHead(model.config.text_config.hidden_size)
    torch.nn.init.normal_(head.summary.weight, std=0.5)
    target, longer, shorter = samples[0], samples[1], samples[2]  # the clip in the middle: left-padded in the batch
    logprob_tests.test_sample_is_padding_invariant(PolicyAndValue(model, Critic(head)), model, processor, [target, longer, shorter])


@VIDEO_FAMILIES
def test_forward_positions_of_clips_are_the_ones_generate_used(family, model, processor, samples):
    family_tests.test_forward_positions_are_the_ones_generate_used(family, model, processor, samples[:4])


@VIDEO_FAMILIES
def test_each_family_spaces_a_clips_temporal_positions_its_own_way(family, model, processor, samples):
    """Qwen2-VL: one temporal id per temporal patch; Qwen2.5-VL: `tokens_per_second` ids per second of video
    (`second_per_grid_ts`: 0.5 s per patch of the 4-fps clip, 1 s at 2 fps); Qwen3-VL: a timestamp in text before
    each temporal patch, so each patch starts where its text leaves off."""
    spec = get_family(family)
    gaps, texts = [], []
    for sample in (samples[0], samples[4]):  # 4 fps, 2 fps
        query = encode_prompts(processor, [sample])
        texts.append(processor.tokenizer.decode(query["input_ids"][0]))
        inputs = model_inputs(query)
        videos = {k: inputs[k] for k in spec.video_layout.keys if k in inputs}
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], attention_mask=inputs["attention_mask"],
            **spec.position_inputs(inputs["attention_mask"], inputs["mm_token_type_ids"], {}, videos),
        )
        temporal = positions[0, 0, inputs["mm_token_type_ids"][0] == 2].unique()  # (temporal patches,)
        assert len(temporal) == sample["videos"][0].frames.shape[0] // 2
        gaps.append(temporal.diff().tolist())
    if family == "qwen2_vl":
        assert gaps == [[1, 1, 1], [1, 1, 1]]
    elif family == "qwen2_5_vl":
        step = model.config.vision_config.tokens_per_second
        assert gaps == [[step // 2] * 3, [step] * 3]
    else:
        assert gaps[0] == gaps[1] and min(gaps[0]) > 1  # after each patch's text timestamp, whatever the rate
        # each temporal patch's mean time, from the frames' indices and the rate: (0 + 1) / 2 / 4 fps = 0.125 s, ...
        assert [t for t in ("<0.1 seconds>", "<0.6 seconds>", "<1.1 seconds>", "<1.6 seconds>") if t in texts[0]] == ["<0.1 seconds>", "<0.6 seconds>", "<1.1 seconds>", "<1.6 seconds>"]
        assert all(f"<{t} seconds>" in texts[1] for t in ("0.2", "1.2", "2.2", "3.2"))  # 2 fps: 0.25 s, 1.25 s, ...


@VIDEO_FAMILIES
def test_video_tokens_are_never_sampled(family, model, processor, samples):
    tok = processor.tokenizer
    video_pad = tok.convert_tokens_to_ids(get_family(family).video_token)
    prompts = model_inputs(encode_prompts(processor, samples[:2]))
    handle = generation_tests.add_logit_bias(model, [video_pad], 50.0)
    try:
        torch.manual_seed(0)
        naive = model.generate(**prompts, max_new_tokens=3, do_sample=True, pad_token_id=pad_token_id(tok))
        assert (naive[:, prompts["input_ids"].shape[1] :] == video_pad).any()  # the hazard is real
        ours = generate_responses(model, prompts, make_generation_config(tok, max_new_tokens=3))
        assert not (ours == video_pad).any()
    finally:
        handle.remove()


@VIDEO_FAMILIES
def test_a_prompt_is_never_cut_through_its_video(family, model_dir, processor, video_data_dir):
    """A prompt's length counts its video tokens; one over max_prompt_length is an error naming it (or dropped
    whole with skip_long_prompts), never cut."""
    dataset = load_samples(video_data_dir / "train.jsonl", resize=image_resize(str(model_dir), processor))
    lengths = prompt_lengths(processor, dataset)
    clip = next(i for i in range(len(dataset)) if dataset[i]["videos"])
    sample = dataset[clip]
    without = {**sample, "prompt": [{"role": "user", "content": sample["prompt"][0]["content"][1:]}], "videos": []}
    video_tokens = int((encode_prompts(processor, [sample])["input_ids"] == processor.video_token_id).sum())
    assert video_tokens == 16 and lengths[clip] >= prompt_lengths(processor, [without])[0] + video_tokens
    limit = lengths[clip] - 1  # the clip's prompt is one token too long
    with pytest.raises(PromptTooLongError) as err:
        encode_prompts(processor, [sample], max_prompt_length=limit)
    assert f"{sample['_source']} ({lengths[clip]} tokens)" in str(err.value)
    kept = drop_long_prompts(processor, dataset, limit)
    assert [r["_source"] for r in kept.rows] == [r["_source"] for r, n in zip(dataset.rows, lengths) if n <= limit]
    assert sample["_source"] not in {r["_source"] for r in kept.rows}


@VIDEO_FAMILIES
def test_the_integrity_checks_catch_dropped_or_misaligned_videos(family, model, processor, samples):
    query = encode_prompts(processor, samples[:3])
    names = [s["_source"] for s in samples[:3]]
    inputs = model_inputs(query)
    check_model_inputs(model, inputs, query["num_images"], names, "ok", query["num_videos"])
    with pytest.raises(MultimodalIntegrityError, match="pixel_values_videos has .* patch rows"):
        dropped = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:-4])
        check_model_inputs(model, dropped, query["num_images"], names, "x", query["num_videos"])
    with pytest.raises(MultimodalIntegrityError, match="video_grid_thw has 2 rows but the samples hold 1 videos"):
        check_model_inputs(model, inputs, query["num_images"], names, "x", [1, 0, 0])
    video_pad = processor.video_token_id
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == video_pad).nonzero()[0]] = processor.tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(MultimodalIntegrityError, match=f"sample {names[0]} has 15 <\\|video_pad\\|> tokens but its 1 video"):
        check_model_inputs(model, dict(inputs, input_ids=ids), query["num_images"], names, "x", query["num_videos"])
    tok = processor.tokenizer
    rollout = Rollout.from_generation(query, torch.full((3, 2), 30), eos_token_ids(tok), pad_token_id(tok), names, get_family(family))
    broken = dataclasses.replace(rollout, videos=dataclasses.replace(rollout.videos, counts=[0, 2, 0]))
    with pytest.raises(MultimodalIntegrityError, match="old-policy forward: sample"):
        response_logprobs(model, broken, 1.0, where="old-policy forward")  # every forward runs the check


@VIDEO_FAMILIES
def test_select_keeps_each_rows_own_videos(family, processor, samples):
    batch = samples[:5]
    query = encode_prompts(processor, batch)
    assert query["num_videos"] == [1, 1, 0, 0, 1] and query["num_images"] == [0, 1, 0, 1, 0]
    tok = processor.tokenizer
    rollout = Rollout.from_generation(query, torch.full((5, 2), 30), eos_token_ids(tok), pad_token_id(tok), ["s"] * 5, get_family(family))
    picked = rollout.select([4, 2, 0])
    alone = [encode_prompts(processor, [batch[i]]) for i in (4, 0)]
    for key in get_family(family).video_layout.keys:
        assert torch.equal(picked.videos.tensors[key], torch.cat([a[key] for a in alone])), key
    assert picked.num_videos() == [1, 0, 1] and rollout.select([2, 3]).videos is None


@VIDEO_FAMILIES
def test_concat_keeps_each_rows_own_videos_and_their_features(family, model, processor, samples):
    """Dynamic sampling joins the rounds' rollouts (`Rollout.concat`): rows with and without clips, and a round without
    any, give the rows' videos in order, with their encoded features (features only when every round has them)."""
    batch = samples[:5]
    query = encode_prompts(processor, batch)
    tok = processor.tokenizer
    features = encode_videos(model, query)
    rollout = Rollout.from_generation(query, torch.full((5, 2), 30), eos_token_ids(tok), pad_token_id(tok), ["s"] * 5, get_family(family), video_features=features)
    parts = [rollout.select([0, 1]), rollout.select([2, 3]), rollout.select([4])]  # the middle round holds no clip
    joined = Rollout.concat(parts, pad_token_id(tok))
    assert joined.num_videos() == [1, 1, 0, 0, 1]
    for key, value in rollout.videos.tensors.items():
        assert torch.equal(joined.videos.tensors[key], value), key
    assert all(a is b for a, b in zip(joined.videos.features.per_image, features.per_image, strict=True))
    without = Rollout.concat([parts[0], dataclasses.replace(parts[2], videos=dataclasses.replace(parts[2].videos, features=None))], pad_token_id(tok))
    assert without.num_videos() == [1, 1, 1] and without.videos.features is None


@VIDEO_FAMILIES
def test_a_group_of_clip_rows_shares_its_prompt_as_the_per_row_path(family, model, processor, samples):
    """Groups of rows asking a clip, a clip and a picture, and a text-only prompt: each prompt prefilled once in
    `generate` (greedy tokens identical to the per-row path; sampled tokens too, from one seed) and run once by a
    forward, its cache repeated to the rows, with the video's M-RoPE positions passed explicitly: logprobs,
    entropy, values and gradients those of the full forward to float rounding (other shapes, the same sums)."""
    prefix_tests.test_greedy_group_prefill_gives_the_per_row_tokens(model, processor, samples)
    prefix_tests.test_sampled_group_tokens_have_the_logprobs_a_forward_recomputes(model, processor, samples)
    prefix_tests.test_shared_prompt_forward_gives_the_full_forwards_numbers_and_gradients(model, processor, samples)


@VIDEO_FAMILIES
def test_a_clip_in_two_prompts_is_encoded_once(family, model, model_dir, processor, samples, video_data_dir):
    """The same clip asked about twice (two questions; the second reads the file again) and another clip:
    the tower runs once over the two distinct clips, both prompts read the same features, which are the ones each
    clip gets when every video is encoded (to float rounding: the tower's batch differs)."""
    clip, other = samples[4], samples[5]
    again = {**clip, "videos": [open_video(VideoRef(clip["videos"][0].name), video_data_dir, "again", image_resize(str(model_dir), processor).video)]}
    again["prompt"] = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Say a colour."}]}]
    query = encode_prompts(processor, [clip, other, again])
    with reuse_tests.tower_calls(model) as calls:
        features = encode_videos(model, query)
    every = encode_videos(model, query, deduplicate=False)
    per_video = features.per_image
    assert calls == [1] and per_video[0] is per_video[2] and per_video[1] is not per_video[0]
    for mine, theirs in zip(per_video, every.per_image, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5)


@VIDEO_FAMILIES
def test_a_forward_takes_encoded_features_for_every_kind_or_for_none(family, model, processor, samples):
    query = encode_prompts(processor, samples[:2])  # a clip; a clip and a picture
    inputs = model_inputs(query)
    model.requires_grad_(False)  # (features stand in for a tower only where no gradient of it is wanted)
    images = encode_images(model, query["pixel_values"], query["image_grid_thw"])
    videos = encode_videos(model, query)
    assert with_encoded_features(model, inputs, {"image": images, "video": None}) is inputs  # pixels for both kinds
    encoded = with_encoded_features(model, inputs, {"image": images, "video": videos})
    assert set(encoded["mm_encoder_outputs"]) == {"image", "video"} and not {"pixel_values", "pixel_values_videos"} & set(encoded)
    assert torch.equal(model(**inputs).logits, model(**encoded).logits)  # the same numbers, the tower run once


@VIDEO_FAMILIES
def test_encoded_clips_are_reused_exactly_in_a_ppo_iteration(family, model_dir, video_data_dir, tmp_path):
    """One PPO iteration on clips and pictures with reuse on and off: bit-identical tokens, scores and gradients;
    the policy's tower runs once per kind per rollout (images, videos) with reuse, at every forward without."""
    from vlm_rl.ppo import build_trainer

    def trainer(name, reuse):
        config = make_config(
            tmp_path / name, model_dir, video_data_dir, reward=["trainer_helpers:completion_length"], reuse_vision_features=reuse, **reuse_tests.MICRO
        )
        return reuse_tests.with_value_head(build_trainer(config))

    on, off = trainer("on", True), trainer("off", False)
    with reuse_tests.tower_calls(*reuse_tests.models_of(on)) as calls_on:
        reused = reuse_tests.iteration(on)
    with reuse_tests.tower_calls(*reuse_tests.models_of(off)) as calls_off:
        encoded = reuse_tests.iteration(off)
    rollout = reused[0]
    kinds = int(sum(rollout.num_images) > 0) + int(rollout.videos is not None)
    assert rollout.videos is not None and rollout.videos.features is not None and encoded[0].videos.features is None
    assert calls_on == [kinds, 0] and calls_off[0] > 4 * kinds
    reuse_tests.assert_same_iteration(reused, encoded)


def test_llava_refuses_video_rows_by_name_before_any_model_loads(family_dirs, video_data_dir, tmp_path, monkeypatch):
    import vlm_rl.ppo as ppo

    monkeypatch.setattr(ppo, "load_policy_and_reference", lambda config: pytest.fail("a model was loaded"))
    config = make_config(tmp_path, family_dirs("llava"), video_data_dir)
    with pytest.raises(DataError) as err:
        ppo.build_trainer(config)
    message = str(err.value)
    lines = (video_data_dir / "train.jsonl").read_text().splitlines()
    video_rows = [i + 1 for i, line in enumerate(lines) if '"video"' in line]
    assert 0 < len(video_rows) < len(lines)
    for n in video_rows:
        assert f"{video_data_dir / 'train.jsonl'}:{n}: field 'video': a video, but the model's processor (LlavaProcessor) takes no video" in message
    assert f"{len(video_rows)} problem(s) in {len(video_rows)} of {len(lines)} row(s)" in message


@VIDEO_FAMILIES
def test_reward_pairs_of_clips_collate_the_same_from_the_cache(family, processor, video_data_dir):
    """`train-reward` on clip pairs: the cached collator (each pair through the processor once) gives the batch the
    processor gives, videos included (each pair's clip for its chosen and its rejected row)."""
    from reward_models.train_reward import PairCollator, load_pairs

    dataset = load_pairs(video_data_dir / "preferences.jsonl", "train")[0]
    pairs = [dataset[i] for i in range(4)]
    fresh, cached = (PairCollator(processor, get_family(family), "right", None, cache=c) for c in (False, True))
    cached(pairs[1:])  # fills the cache in another batch
    a, b = fresh(pairs), cached(pairs)
    videos = [len(p["videos"]) for p in pairs]
    assert sum(videos) and a["num_videos"] == b["num_videos"] == videos * 2 and a.keys() == b.keys()
    for key in a:  # exact: token ids, masks and pixels the processor prepares per image and video (no GEMM)
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_train_reward_on_clip_pairs(family_dirs, video_data_dir, tmp_path):
    """`vlm-rl train-reward` on the synthetic clip and picture pairs: trains, evaluates and saves a reward model
    whose score depends on the clip."""
    from reward_models.train_reward import main
    from reward_models.vlm_reward import VLMRewardModel

    data = str(video_data_dir / "preferences.jsonl")
    results = main([
        "--model_name_or_path", str(family_dirs("qwen2_vl")), "--train_data", data, "--eval_data", data, "--output_dir", str(tmp_path / "rm"),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--cache_encodings", "--use_cpu", "--seed", "0",
    ])  # fmt: skip
    assert results["eval_pairs"] == 13 and results["global_step"] == 2
    rm = VLMRewardModel.from_pretrained(tmp_path / "rm")
    clip = next(p for p in load_samples(video_data_dir / "preferences.jsonl") if p["videos"])
    video = clip["videos"][0]
    backwards = dataclasses.replace(video, frames=video.frames.flip(0))
    forwards, reversed_ = (rm([clip["prompt"]], [clip["chosen"]], videos=[[v]])[0] for v in (video, backwards))
    assert forwards != reversed_
