"""Synthetic visual question answering with verifiable answers: coloured shapes on a canvas.

Each scene holds 1-4 copies of one shape in one colour, in a row through one half of the image. A row asks
about one attribute (colour, shape, count, position) and has a one-word `answer`. `response` is the
demonstration an SFT stage learns from; with `noise > 0` a fraction of demonstrations is wrong (as
human demonstrations are), while `answer` stays the truth a verifiable reward checks against.

The video tasks (`motion`, `appear`: `vlm_rl.data.synthetic_clips`) ask about short clips of such scenes instead;
their rows carry a `video` (an mp4), and `train_frames.jsonl`/`test_frames.jsonl` hold the same rows with each
video as its directory of frames.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_rl.atomic import atomic_dir
from vlm_rl.data.shape_words import COLOURS, COUNT_WORDS, POSITIONS, SHAPES, draw_shape

IMAGE_TASKS = ["colour", "shape", "count", "position"]
VIDEO_TASKS = ["motion", "appear"]  # vlm_rl.data.synthetic_clips.CLIP_TASKS
TASKS = IMAGE_TASKS + VIDEO_TASKS

QUESTIONS = {
    "colour": "What colour is the {shape}? Answer with one word.",
    "shape": "What shape is in the picture? Answer with one word.",
    "count": "How many {shape}s are there? Answer with one word.",
    "position": "Where is the {colour} {shape}: left, right, top or bottom? Answer with one word.",
}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    position: str
    size: tuple[int, int]

    def answer(self, task: str) -> str:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": COUNT_WORDS[self.count - 1],
            "position": self.position,
        }[task]

    def choices(self, task: str) -> list[str]:
        return {"colour": COLOURS, "shape": SHAPES, "count": COUNT_WORDS, "position": POSITIONS}[task]


def random_scene(rng: random.Random) -> Scene:
    width = rng.choice([56, 84])
    height = rng.choice([56, 84])
    return Scene(rng.choice(COLOURS), rng.choice(SHAPES), rng.randint(1, 4), rng.choice(POSITIONS), (width, height))


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Render the scene: `count` shapes in one evenly spaced row through the middle of the named half, so that
    shapes never touch (the count is unambiguous) and the group sits in that half only (a "top" scene is not
    also a "left" scene). Each shape fills 70% of its slot (with +-1 px jitter: always >= 2 px apart): as large as the layout allows, because a tiny
    vision encoder cannot find a shape that covers a sliver of one vision token."""
    width, height = scene.size
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    k = scene.count
    if scene.position in ("left", "right"):
        side = int(0.7 * min(width / 2, height / k))
    else:
        side = int(0.7 * min(height / 2, width / k))
    if scene.position in ("left", "right"):
        x = width * (0.25 if scene.position == "left" else 0.75)
        centres = [(x, height * (j + 0.5) / k) for j in range(k)]
    else:
        y = height * (0.25 if scene.position == "top" else 0.75)
        centres = [(width * (j + 0.5) / k, y) for j in range(k)]
    for cx, cy in centres:
        cx += rng.randint(-1, 1)
        cy += rng.randint(-1, 1)
        draw_shape(draw, scene.shape, scene.colour, cx, cy, side)
    return image


def make_row(scene: Scene, task: str, image_path: str, rng: random.Random, noise: float) -> dict:
    question = QUESTIONS[task].format(shape=scene.shape, colour=scene.colour)
    return {"image": image_path, **_qa(question, scene.answer(task), scene.choices(task), task, rng, noise)}


def _qa(question: str, answer: str, choices: list[str], task: str, rng: random.Random, noise: float) -> dict:
    """The question, a demonstration (wrong with probability `noise`), the true answer and a wrong one."""
    wrong = rng.choice([c for c in choices if c != answer])
    response = wrong if rng.random() < noise else answer
    return {"prompt": question, "response": response, "answer": answer, "task": task, "wrong_answer": wrong}


def make_synthetic_data(
    out_dir: str | os.PathLike,
    n: int = 400,
    seed: int = 0,
    test_fraction: float = 0.2,
    noise: float = 0.0,
    tasks: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `images/`, `train.jsonl`, `test.jsonl`, `preferences.jsonl`, `preferences_test.jsonl` to `out_dir`;
    with video tasks also `clips/` (mp4), `frames/` (a directory of PNG frames per clip) and `train_frames.jsonl`,
    `test_frames.jsonl` (the same rows, each video given as its frames).

    Deterministic per seed; the directory appears whole or not at all. A non-empty `out_dir` is refused (before
    anything is drawn) unless `overwrite`, which replaces it whole.
    """
    tasks = tasks or IMAGE_TASKS
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {TASKS}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    from vlm_rl.data.synthetic_clips import random_clip, write_clip

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        n_test = int(round(n * test_fraction))
        rows, frame_dirs = [], {}
        for i in range(n):
            # The scene is drawn before the task is chosen (image-only data as before video tasks existed, draw for draw).
            scene = random_scene(rng)
            image = draw_scene(scene, rng)
            task = rng.choice(tasks)
            # Test rows keep their true answer as the response: they are for evaluation.
            row_noise = 0.0 if i >= n - n_test else noise
            if task in VIDEO_TASKS:
                clip = random_clip(task, rng)
                video, frame_dirs[i] = write_clip(clip, tmp, f"{i:06d}")
                rows.append({"video": video, **_qa(clip.question(), clip.answer(), clip.choices(), task, rng, row_noise)})
                continue
            image_path = f"images/{i:06d}.png"
            image.save(tmp / image_path)
            rows.append(make_row(scene, task, image_path, rng, row_noise))
        splits = {"train": (0, n - n_test), "test": (n - n_test, n)}
        for split, (start, stop) in splits.items():
            _write_jsonl(tmp / f"{split}.jsonl", rows[start:stop])
            _write_jsonl(tmp / ("preferences.jsonl" if split == "train" else "preferences_test.jsonl"), [_preference(r) for r in rows[start:stop]])
            if frame_dirs:
                as_frames = [{**r, "video": frame_dirs[i]} if i in frame_dirs else r for i, r in enumerate(rows[start:stop], start)]
                _write_jsonl(tmp / f"{split}_frames.jsonl", as_frames)
    return out_dir


def _preference(row: dict) -> dict:
    media = {k: row[k] for k in ("image", "video") if k in row}
    return {**media, "prompt": row["prompt"], "chosen": row["answer"], "rejected": row["wrong_answer"]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def resolve_data_path(spec: str, split: str = "train") -> str:
    """'synthetic' -> the embedded shapes VQA set's `split` file (built once into the cache); else `spec`."""
    if spec != "synthetic":
        return str(spec)
    from vlm_rl.cache import cache_dir

    # Versioned like the tiny model's cache (v2: shapes in a row through the middle of their half, never touching).
    path = cache_dir() / "shapes-v2-n400-seed0"
    if not (path / "train.jsonl").exists():
        make_synthetic_data(path, n=400, seed=0, overwrite=True)  # the cache is vlm-rl's own: a broken one is rebuilt
    return str(path / f"{split}.jsonl")
