"""The synthetic shapes VQA set: deterministic, well split, and every answer is what the picture shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_rl.data.shape_words import COLOURS, COUNT_WORDS, POSITIONS, RGB, SHAPES
from vlm_rl.data.synthetic import IMAGE_TASKS, make_synthetic_data

BACKGROUND = (250, 250, 250)
FILES = ["train.jsonl", "test.jsonl", "preferences.jsonl", "preferences_test.jsonl"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_bytes(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def noisy_dir(tmp_path_factory) -> Path:
    return make_synthetic_data(tmp_path_factory.mktemp("noisy") / "shapes", n=300, seed=3, noise=0.3)


# ---------------------------------------------------------------- determinism, splits, files


def test_same_seed_is_byte_identical(synthetic_data_dir, tmp_path):
    again = make_synthetic_data(tmp_path / "again", n=40, seed=0)  # the conftest set is n=40, seed=0
    a, b = all_bytes(synthetic_data_dir), all_bytes(again)
    assert sorted(a) == sorted(b)
    assert sum(name.endswith(".png") for name in a) == 40
    for name in a:
        assert a[name] == b[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp directory left behind


def test_different_seed_differs(synthetic_data_dir, tmp_path):
    other = make_synthetic_data(tmp_path / "seed1", n=40, seed=1)
    assert (other / "train.jsonl").read_bytes() != (synthetic_data_dir / "train.jsonl").read_bytes()
    a, b = all_bytes(synthetic_data_dir), all_bytes(other)
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) > 30


def test_split_sizes_and_files(synthetic_data_dir):
    train, test = read_jsonl(synthetic_data_dir / "train.jsonl"), read_jsonl(synthetic_data_dir / "test.jsonl")
    assert len(train) == 32 and len(test) == 8  # n=40, test_fraction=0.2
    assert len(read_jsonl(synthetic_data_dir / "preferences.jsonl")) == 32
    assert len(read_jsonl(synthetic_data_dir / "preferences_test.jsonl")) == 8
    images = [r["image"] for r in train + test]
    assert len(set(images)) == 40  # every row its own image, train and test disjoint
    for r in train + test:
        assert set(r) == {"image", "prompt", "response", "answer", "task", "wrong_answer"}
        assert (synthetic_data_dir / r["image"]).is_file() and not Path(r["image"]).is_absolute()
        assert r["task"] in IMAGE_TASKS


@pytest.mark.parametrize("n, test_fraction, n_test", [(10, 0.2, 2), (7, 0.0, 0), (25, 0.5, 12)])
def test_other_split_fractions(tmp_path, n, test_fraction, n_test):
    out = make_synthetic_data(tmp_path / "d", n=n, seed=0, test_fraction=test_fraction)
    assert len(read_jsonl(out / "test.jsonl")) == n_test
    assert len(read_jsonl(out / "train.jsonl")) == n - n_test


def test_preferences_pair_the_answer_with_a_wrong_one(synthetic_data_dir):
    for rows_file, pref_file in [("train.jsonl", "preferences.jsonl"), ("test.jsonl", "preferences_test.jsonl")]:
        rows, prefs = read_jsonl(synthetic_data_dir / rows_file), read_jsonl(synthetic_data_dir / pref_file)
        assert len(rows) == len(prefs)
        for row, pref in zip(rows, prefs):
            assert set(pref) == {"image", "prompt", "chosen", "rejected"}
            assert pref["image"] == row["image"] and pref["prompt"] == row["prompt"]
            assert pref["chosen"] == row["answer"] != pref["rejected"]
            assert pref["rejected"] == row["wrong_answer"]
            assert pref["rejected"] in CHOICES[row["task"]]


def test_noise_makes_that_fraction_of_train_responses_wrong(noisy_dir):
    train, test = read_jsonl(noisy_dir / "train.jsonl"), read_jsonl(noisy_dir / "test.jsonl")
    assert len(train) == 240 and len(test) == 60
    wrong = [r for r in train if r["response"] != r["answer"]]
    assert 0.2 < len(wrong) / len(train) < 0.4
    for r in wrong:
        assert r["response"] in CHOICES[r["task"]]
    assert all(r["response"] == r["answer"] for r in test)  # test rows are for evaluation: always right
    # The preference pairs use the truth, not the noisy demonstration.
    assert [p["chosen"] for p in read_jsonl(noisy_dir / "preferences.jsonl")] == [r["answer"] for r in train]


def test_no_noise_means_every_response_is_the_answer(synthetic_data_dir):
    rows = read_jsonl(synthetic_data_dir / "train.jsonl") + read_jsonl(synthetic_data_dir / "test.jsonl")
    assert all(r["response"] == r["answer"] for r in rows)


def test_tasks_restrict_the_questions(tmp_path):
    out = make_synthetic_data(tmp_path / "d", n=12, seed=0, tasks=["count", "colour"])
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")
    assert {r["task"] for r in rows} <= {"count", "colour"}
    assert {r["task"] for r in rows} == {"count", "colour"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ["colour", "size"]}, "unknown task"),
        ({"noise": -0.1}, "noise"),
        ({"noise": 1.0}, "noise"),
        ({"n": 0}, "n must be"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.5}, "test_fraction"),
    ],
)
def test_invalid_arguments_raise_and_write_nothing(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_data(tmp_path / "out", **{"n": 5, **kwargs})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- answers agree with the pictures

CHOICES = {"colour": COLOURS, "shape": SHAPES, "count": COUNT_WORDS, "position": POSITIONS}


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def read_scene(image: Image.Image) -> dict:
    """Recover colour, shape, count and position from the pixels alone."""
    pixels = np.asarray(image.convert("RGB"))
    h, w, _ = pixels.shape
    present = {c: (pixels == RGB[c]).all(-1) for c in COLOURS}
    colours = [c for c, m in present.items() if m.any()]
    assert len(colours) == 1, colours  # one colour; everything else is background
    colour = colours[0]
    mask = present[colour]
    assert (mask | (pixels == BACKGROUND).all(-1)).all()
    parts = components(mask)
    # Fill of each shape's bounding box: square ~1, circle ~pi/4, triangle ~1/2.
    fills = []
    for part in parts:
        box_h = part[:, 0].max() - part[:, 0].min() + 1
        box_w = part[:, 1].max() - part[:, 1].min() + 1
        fills.append(len(part) / (box_h * box_w))
    fill = float(np.mean(fills))
    shape = "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"
    assert all(("square" if f > 0.93 else "circle" if f > 0.68 else "triangle") == shape for f in fills), fills
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    sides = {"left": xs.max() < w / 2, "right": xs.min() >= w / 2, "top": ys.max() < h / 2, "bottom": ys.min() >= h / 2}
    # Exactly one answer fits: the group sits in one half and is centred along the other axis.
    if abs(cy - 0.5) < 0.1:
        fits = [p for p in ("left", "right") if sides[p]]
    else:
        assert abs(cx - 0.5) < 0.1, (cx, cy)
        fits = [p for p in ("top", "bottom") if sides[p]]
    assert len(fits) == 1, (sides, cx, cy)
    return {"colour": colour, "shape": shape, "count": COUNT_WORDS[len(parts) - 1], "position": fits[0]}


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> Path:
    return make_synthetic_data(tmp_path_factory.mktemp("scenes") / "shapes", n=160, seed=7, test_fraction=0.25)


def test_answers_match_the_pictures(scenes_dir):
    rows = read_jsonl(scenes_dir / "train.jsonl") + read_jsonl(scenes_dir / "test.jsonl")
    seen = {task: set() for task in IMAGE_TASKS}
    for r in rows:
        with Image.open(scenes_dir / r["image"]) as image:
            assert image.mode == "RGB"
            assert image.size[0] in (56, 84) and image.size[1] in (56, 84)
            scene = read_scene(image)
        assert r["answer"] == scene[r["task"]], (r, scene)
        assert r["answer"] in CHOICES[r["task"]]
        assert r["wrong_answer"] in CHOICES[r["task"]] and r["wrong_answer"] != r["answer"]
        # The question names the right shape (and colour) and never gives the answer away.
        if r["task"] in ("colour", "count", "position"):
            assert scene["shape"] in r["prompt"]
        if r["task"] == "position":
            assert scene["colour"] in r["prompt"]
        if r["task"] in ("colour", "shape"):
            assert r["answer"] not in r["prompt"].lower()
        seen[r["task"]].add(r["answer"])
    # Enough variety that every task has several distinct answers.
    assert all(len(answers) >= 3 for answers in seen.values()), seen


def test_colour_questions_answer_the_colour_of_the_shape_pixels(scenes_dir):
    rows = [r for r in read_jsonl(scenes_dir / "train.jsonl") if r["task"] == "colour"]
    assert rows
    for r in rows:
        pixels = np.asarray(Image.open(scenes_dir / r["image"]))
        counts = {c: int((pixels == RGB[c]).all(-1).sum()) for c in COLOURS}
        assert counts[r["answer"]] > 50  # a real shape, not a stray pixel
        assert max(counts, key=counts.get) == r["answer"]
        assert counts[r["wrong_answer"]] == 0


def test_resolve_data_path_builds_the_default_set_once(tmp_path, monkeypatch):
    from vlm_rl.data.synthetic import resolve_data_path

    monkeypatch.setenv("VLM_RL_CACHE", str(tmp_path / "cache"))
    train = Path(resolve_data_path("synthetic"))
    assert train.name == "train.jsonl" and train.is_relative_to(tmp_path / "cache")
    assert len(read_jsonl(train)) == 320
    mtime = train.stat().st_mtime_ns
    test = Path(resolve_data_path("synthetic", split="test"))
    assert test == train.parent / "test.jsonl" and len(read_jsonl(test)) == 80
    assert train.stat().st_mtime_ns == mtime  # not rebuilt
    assert resolve_data_path("my/data.jsonl") == "my/data.jsonl"
