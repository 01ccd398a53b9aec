"""Video parts in every conversational format, read through qwen-vl-utils (decord for files): the same frames from a
file, a frame directory and a frame list; the part's own sampling and sizing options; errors that name the row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_rl.data.formats import DataError, load_samples
from vlm_rl.data.images import ImageResize
from vlm_rl.data.prompts import distinct_prompts
from vlm_rl.data.synthetic_clips import Clip, draw_clip, write_clip
from vlm_rl.data.videos import VideoResize, open_video, video_backend
from vlm_rl.errors import UserError

RESIZE = VideoResize(patch_size=14, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 36)  # the tiny Qwen2-VL's frame bounds
RESIZE_OF_PROCESSOR = ImageResize(14, 28 * 28 * 4, 28 * 28 * 36, RESIZE)  # what image_resize gives for it
QUESTION = {"type": "text", "text": "Which way does it move?"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Two clips, each as clips/NAME.mp4 and frames/NAME/*.png."""
    root = tmp_path_factory.mktemp("clips")
    write_clip(Clip("motion", ("red",), ("square",), direction="right"), root, "right")
    write_clip(Clip("motion", ("blue",), ("circle",), direction="top"), root, "up")
    return root


def write_rows(root: Path, name: str, rows: list[dict]) -> Path:
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_a_file_a_frame_directory_and_a_frame_list_give_the_same_video(clips):
    frames = sorted(str(p) for p in (clips / "frames" / "right").iterdir())
    sources = ["clips/right.mp4", f"file://{clips / 'clips' / 'right.mp4'}", "frames/right", frames]
    videos = [open_video(source, clips, "row", RESIZE) for source in sources]
    drawn = torch.stack([torch.from_numpy(np.asarray(f)).permute(2, 0, 1) for f in draw_clip(Clip("motion", ("red",), ("square",), direction="right"))])
    for video in videos:
        assert torch.equal(video.frames, drawn)  # lossless mp4; 56x56 frames are already on the 28-px grid
        assert (video.fps, video.frame_indices, video.total_frames) == (2.0, tuple(range(8)), 8)
    assert videos[0].describe() == "8 frames 56x56 at 2 fps from clips/right.mp4"


@pytest.mark.parametrize(
    "options, frames, size",
    [
        ({"nframes": 4}, (0, 2, 5, 7), (56, 56)),  # qwen-vl-utils: linspace over the clip, rounded
        ({"fps": 1}, (0, 2, 5, 7), (56, 56)),  # 4 s at 1 frame per second (and min_frames 4)
        ({"max_pixels": 28 * 28 * 16}, tuple(range(8)), (56, 56)),  # within bounds: as stored
        ({"min_pixels": 28 * 28 * 16}, tuple(range(8)), (112, 112)),  # at least 16 tokens' worth of pixels a frame
        ({"total_pixels": 28 * 28 * 8}, tuple(range(8)), (56, 56)),  # 8 frames share 8 tokens' pixels: the floor wins
        ({"resized_height": 56, "resized_width": 112}, tuple(range(8)), (112, 56)),
        ({"video_start": 1.0, "video_end": 3.0, "nframes": 2}, (2, 6), (56, 56)),
    ],
)
def test_the_parts_own_options_sample_and_size_as_qwen_vl_utils_does(clips, options, frames, size):
    row = {"messages": user({"type": "video", "video": "clips/right.mp4", **options}, QUESTION)}
    (sample,) = load_samples(write_rows(clips, "options.jsonl", [row]), resize=RESIZE_OF_PROCESSOR)
    video = sample["videos"][0]
    assert video.frame_indices == frames and video.size == size


def test_trl_placeholders_take_the_videos_column_in_order_mixed_with_images(clips):
    Image.new("RGB", (56, 56), "white").save(clips / "still.png")
    rows = [
        {"prompt": user({"type": "video"}, {"type": "image"}, {"type": "video"}, QUESTION), "images": ["still.png"],
         "videos": ["clips/up.mp4", "frames/right"]},
        {"prompt": "<video>\nWhich way?", "video": [f"frames/up/{i:02d}.png" for i in range(8)]},  # one video: its frames
        {"video": "clips/right.mp4", "prompt": "Which way does it move?", "answer": "right"},  # plain: a <video> first
    ]
    first, second, third = load_samples(write_rows(clips, "trl.jsonl", rows), resize=RESIZE_OF_PROCESSOR)
    assert [p["type"] for p in first["prompt"][0]["content"]] == ["video", "image", "video", "text"]
    assert [v.name for v in first["videos"]] == ["clips/up.mp4", "frames/right"] and len(first["images"]) == 1
    assert len(second["videos"]) == 1 and len(second["videos"][0].frames) == 8
    assert torch.equal(second["videos"][0].frames, first["videos"][0].frames)
    assert third["prompt"][0]["content"][0] == {"type": "video"} and third["answer"] == "right"


@pytest.mark.parametrize(
    "part, extra, named",
    [
        ({"type": "video"}, {"videos": ["clips/up.mp4", "clips/right.mp4"]}, "field 'videos': 2 video(s) but 1 video placeholder(s)"),
        ({"type": "video", "video": "clips/none.mp4"}, {}, "does not exist"),
        ({"type": "video", "video": "notes.mp4"}, {}, "cannot be decoded by decord"),
        ({"type": "video", "video": "https://example.com/a.mp4"}, {}, "nothing is downloaded"),
        ({"type": "video", "video": "clips/up.mp4", "fps": 1, "nframes": 4}, {}, "both fps and nframes"),
        ({"type": "video", "video": "frames/up", "nframes": 4}, {}, "a list of frames is used whole"),
        ({"type": "video", "video": "clips/up.mp4", "nframes": 40}, {}, "cannot be sampled so"),
        ({"type": "video", "video": "empty"}, {}, "holds no frame images"),
        ({"type": "video", "fps": 1}, {"videos": ["clips/up.mp4"]}, "options ['fps'] on a part without its own video"),
    ],
)
def test_a_bad_video_is_named_by_file_line_and_field(clips, part, extra, named):
    (clips / "notes.mp4").write_text("not a video")
    (clips / "empty").mkdir(exist_ok=True)
    good = {"messages": user({"type": "video", "video": "clips/up.mp4"}, QUESTION)}
    path = write_rows(clips, "bad.jsonl", [good, {"messages": user(part, QUESTION), **extra}])
    with pytest.raises(DataError) as info:
        load_samples(path, resize=RESIZE_OF_PROCESSOR)
    message = str(info.value)
    assert message.startswith(f"{path}:2: field '") and named in message, message


def test_the_backend_is_decord_unless_another_is_forced(monkeypatch):
    from qwen_vl_utils import vision_process

    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER", raising=False)
    assert video_backend() == "decord" and vision_process.get_video_reader_backend() == "decord"
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "pyav")
    with pytest.raises(UserError, match="FORCE_QWENVL_VIDEO_READER='pyav'"):
        video_backend()


def test_samples_ask_the_same_prompt_only_with_the_same_clips(clips):
    """A group's rows share one prompt (data/prompts.distinct_prompts): equal text is not enough, the clips must be
    the same frames sampled alike (the same file read twice is; another clip, or the same clip at another rate, is not)."""
    rows = [
        {"messages": user({"type": "video", "video": "clips/right.mp4"}, QUESTION)},
        {"messages": user({"type": "video", "video": "clips/up.mp4"}, QUESTION)},  # the same text, another clip
        {"messages": user({"type": "video", "video": "frames/right"}, QUESTION)},  # the first clip's frames, read again
        {"messages": user({"type": "video", "video": "clips/right.mp4", "nframes": 4}, QUESTION)},  # sampled otherwise
    ]
    samples = list(load_samples(write_rows(clips, "groups.jsonl", rows), resize=RESIZE_OF_PROCESSOR))
    group = [dict(s) for s in samples for _ in range(2)]  # each prompt twice in a row, as batch_samples gives them
    assert distinct_prompts(group) == ([0, 2, 6], [0, 0, 1, 1, 0, 0, 2, 2])
