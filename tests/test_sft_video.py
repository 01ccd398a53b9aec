"""SFT on clips: TRL's collator, with each sample's videos, gives the model what PPO gives it for the same prompt."""

from __future__ import annotations

import pytest
import torch

from vlm_rl.data.formats import load_samples
from vlm_rl.data.prompts import encode_prompts
from vlm_rl.models.loading import image_resize, load_processor
from vlm_rl.sft import to_sft_dataset
from vlm_rl.sft_video import VideoCollator


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])  # Qwen3-VL: the frame timestamps in the prompt too
def test_a_clip_is_the_same_tokens_and_pixels_in_sft_as_in_ppo(family, family_dirs, video_data_dir):
    model_dir = str(family_dirs(family))
    processor = load_processor(model_dir)
    samples = list(load_samples(video_data_dir / "train.jsonl", resize=image_resize(model_dir, processor)))[:5]
    assert any(s["videos"] for s in samples) and any(s["images"] for s in samples)
    dataset = to_sft_dataset(samples)
    batch = VideoCollator(processor=processor, completion_only_loss=True)([dataset[i] for i in range(len(samples))])
    query = encode_prompts(processor, samples)  # what PPO encodes
    for key in ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch[key], query[key]), key
    tokenizer = processor.tokenizer
    for i, sample in enumerate(samples):
        real = batch["attention_mask"][i].bool()
        prompt = batch["input_ids"][i][real & (batch["labels"][i] == -100)]
        assert torch.equal(prompt, query["input_ids"][i][query["attention_mask"][i].bool()]), sample["_source"]
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert tokenizer.decode(labelled) == sample["completion"] + "<|im_end|>\n"  # the answer only
