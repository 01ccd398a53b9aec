"""The synthetic clips: answers that the frames show, and that the first frame alone cannot give."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from vlm_rl.data.shape_words import COLOURS, RGB
from vlm_rl.data.synthetic import make_synthetic_data
from vlm_rl.data.synthetic_clips import BACKGROUND, DIRECTIONS, FRAMES, SIZE, Clip, draw_clip, random_clip


def pixels(frames) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.float32) for f in frames])  # (T, H, W, 3)


def centre_of_shape(frame: np.ndarray) -> np.ndarray:
    """(x, y) of the pixels that are not background."""
    ys, xs = np.nonzero((frame != np.array(BACKGROUND)).any(-1))
    return np.array([xs.mean(), ys.mean()])


def direction_seen(frames: np.ndarray) -> str:
    dx, dy = centre_of_shape(frames[-1]) - centre_of_shape(frames[0])
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")


def last_colour_seen(frames: np.ndarray) -> str:
    """The colour whose pixels appear latest."""
    first_seen = {c: next(t for t in range(len(frames)) if (frames[t] == RGB[c]).all(-1).sum() > 20) for c in COLOURS if (frames[-1] == RGB[c]).all(-1).sum() > 20}
    return max(first_seen, key=first_seen.get)


@pytest.mark.parametrize("task", ["motion", "appear"])
def test_answers_are_what_the_frames_show(task):
    rng = random.Random(0)
    for _ in range(40):
        clip = random_clip(task, rng)
        frames = pixels(draw_clip(clip))
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        seen = direction_seen(frames) if task == "motion" else last_colour_seen(frames)
        assert seen == clip.answer(), clip
        assert clip.answer() in clip.choices()


def test_the_first_frame_is_the_same_whatever_the_answer():
    for direction in DIRECTIONS:  # the same shape moving each way: the same first frame, different last frames
        clip = Clip("motion", ("red",), ("circle",), direction=direction, jitter=(1, -1))
        first, last = pixels(draw_clip(clip))[[0, -1]]
        reference = pixels(draw_clip(Clip("motion", ("red",), ("circle",), direction="left", jitter=(1, -1))))
        assert np.array_equal(first, reference[0])
        assert np.array_equal(last, reference[-1]) == (direction == "left")
        assert clip.question() == Clip("motion", ("red",), ("circle",), direction="left").question()  # nor the question
    base = dict(task="appear", shapes=("square",) * 3, places=(0, 1, 2), starts=(1, 3, 5))
    firsts = [pixels(draw_clip(Clip(colours=(first, "blue", last), **base)))[0] for first, last in (("red", "green"), ("green", "red"))]
    assert np.array_equal(firsts[0], firsts[1]) and (firsts[0] == BACKGROUND).all()  # nothing has appeared yet


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Accuracy of a nearest-centroid classifier (one centroid per answer) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    labels = sorted(set(train_y))
    centroids = np.stack([train_x[np.array(train_y) == c].mean(0) for c in labels])
    predicted = [labels[i] for i in ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float(np.mean([p == y for p, y in zip(predicted, test_y)]))


def colour_counts(frames: np.ndarray) -> np.ndarray:
    """(T * colours,): how many pixels of each colour every frame holds."""
    return np.stack([(frames == RGB[c]).all(-1).sum((-2, -1)) for c in COLOURS], -1).reshape(-1).astype(np.float32)


@pytest.mark.parametrize("task, chance", [("motion", 1 / 4), ("appear", 1 / 6)])
def test_a_model_shown_only_the_first_frame_is_at_chance(task, chance):
    """A classifier of the first frame's pixels answers at chance; the same classifier of the whole clip (motion: how
    the pixels change from the first frame to the last; appear: each frame's colour counts) answers far above it:
    the answer needs more than one frame."""
    rng = random.Random(1)
    clips = [random_clip(task, rng) for _ in range(600)]
    frames = np.stack([pixels(draw_clip(c)) for c in clips])  # (N, T, H, W, 3)
    answers = [c.answer() for c in clips]
    first = frames[:, 0].reshape(len(clips), -1) / 255.0
    if task == "motion":
        change = (frames[:, -1] - frames[:, 0]).reshape(len(clips), -1) / 255.0
    else:
        change = np.stack([colour_counts(f) for f in frames])
    split = 400
    on_first = nearest_centroid_accuracy(first[:split], answers[:split], first[split:], answers[split:])
    on_change = nearest_centroid_accuracy(change[:split], answers[:split], change[split:], answers[split:])
    assert abs(on_first - chance) < 0.1, on_first  # 200 test clips: chance +- 2.5 standard errors
    assert on_change > chance + 0.3, on_change


def test_make_data_writes_each_clip_as_mp4_and_frames(tmp_path):
    out = make_synthetic_data(tmp_path / "d", n=6, seed=0, tasks=["motion", "appear", "colour"], test_fraction=0.5)
    rows = {split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()] for split in ("train", "test", "train_frames", "test_frames")}
    videos = [r for r in rows["train"] + rows["test"] if "video" in r]
    assert videos and len(videos) < 6  # colour rows keep their image
    for split in ("train", "test"):
        for row, framed in zip(rows[split], rows[f"{split}_frames"]):
            assert {k: v for k, v in row.items() if k != "video"} == {k: v for k, v in framed.items() if k != "video"}
            if "video" in row:
                assert (out / row["video"]).suffix == ".mp4" and (out / row["video"]).is_file()
                assert len(list((out / framed["video"]).glob("*.png"))) == FRAMES
    preferences = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert [("video" in p, "image" in p) for p in preferences] == [("video" in r, "image" in r) for r in rows["train"]]
