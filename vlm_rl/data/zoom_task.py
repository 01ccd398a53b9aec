"""The zoom task: a question the model cannot answer from the picture it is shown, only through a tool.

Each scene is a 224 x 224 picture with a large shape in the middle and a small shape in each corner, five different
colours. The question names a corner ("What colour is the shape in the top left corner?"). At the size the zoom
task's processor gives a picture (`ZOOM_MAX_PIXELS`: 56 x 56, four vision tokens) a corner's shape is a few pixels
that share their vision token with a quarter of the middle shape; the built-in `zoom` tool
(vlm_rl/rollout/tools.py) returns the corner (a quarter of the width and of the height) at full resolution, where
the shape fills most of the crop. `sft.jsonl` holds tool-use demonstrations (zoom into the named corner, then
answer); with `noise`, that fraction of them answers without zooming, with a guess (the middle shape's colour).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_rl.atomic import atomic_dir
from vlm_rl.data.shape_words import COLOURS, SHAPES, draw_shape

CORNERS = ("top left", "top right", "bottom left", "bottom right")
SIZE = 224
ZOOM_MAX_PIXELS = 56 * 56  # the zoom task's processor: every picture shown at 56 x 56 (four vision tokens)
QUESTION = "What colour is the shape in the {corner} corner? Answer with one word."
ZOOM_CALL = '<tool_call>\n{{"name": "zoom", "arguments": {{"region": "{corner}"}}}}\n</tool_call>'


def corner_box(width: int, height: int, corner: str) -> tuple[int, int, int, int]:
    """The box `zoom` returns for `corner`: a quarter of the width and of the height, in that corner."""
    w, h = width // 4, height // 4
    lower, right = corner.startswith("bottom"), corner.endswith("right")
    left, top = (width - w if right else 0), (height - h if lower else 0)
    return left, top, left + w, top + h


def draw_zoom_scene(rng: random.Random) -> tuple[Image.Image, dict[str, str], str]:
    """(the picture, each corner's colour, the middle shape's colour)."""
    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    colours = rng.sample(COLOURS, 5)
    middle, corners = colours[0], dict(zip(CORNERS, colours[1:]))
    side = rng.randint(80, 100)
    c = SIZE / 2
    draw_shape(draw, rng.choice(SHAPES), middle, c, c, side)
    for corner, colour in corners.items():
        left, top, right, bottom = corner_box(SIZE, SIZE, corner)
        side = rng.randint(34, 42)
        x = (left + right) / 2 + rng.randint(-3, 3)
        y = (top + bottom) / 2 + rng.randint(-3, 3)
        draw_shape(draw, rng.choice(SHAPES), colour, x, y, side)
    return image, corners, middle


def make_zoom_data(out_dir: str | os.PathLike, n: int = 400, seed: int = 0, test_fraction: float = 0.2, noise: float = 0.0, overwrite: bool = False) -> Path:
    """Write `images/` (each scene and its zoomed corner), `train.jsonl` and `test.jsonl` (prompt, answer, corner) and
    `sft.jsonl` (the training rows as tool-use conversations) to `out_dir`; deterministic per seed, whole or absent."""
    if n < 1 or not 0.0 <= test_fraction < 1.0 or not 0.0 <= noise < 1.0:
        raise ValueError(f"need n >= 1, test_fraction and noise in [0, 1); got n={n}, test_fraction={test_fraction}, noise={noise}")
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        rows, traces = [], []
        n_test = int(round(n * test_fraction))
        for i in range(n):
            image, corners, middle = draw_zoom_scene(rng)
            corner = rng.choice(CORNERS)
            path, crop_path = f"images/{i:06d}.png", f"images/{i:06d}_zoom.png"
            image.save(tmp / path)
            image.crop(corner_box(SIZE, SIZE, corner)).save(tmp / crop_path)
            question = QUESTION.format(corner=corner)
            # `response`: the answer alone, for a single-turn SFT baseline that is never shown the zoomed corner
            rows.append({"image": path, "prompt": question, "response": corners[corner], "answer": corners[corner], "task": "zoom", "corner": corner})
            if i >= n - n_test:
                continue
            user = {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": question}]}
            if rng.random() < noise:  # a demonstration that guesses instead of looking
                traces.append({"messages": [user, {"role": "assistant", "content": middle}], "answer": corners[corner]})
                continue
            traces.append({
                "messages": [
                    user,
                    {"role": "assistant", "content": ZOOM_CALL.format(corner=corner)},
                    {"role": "tool", "name": "zoom", "content": [{"type": "image", "image": crop_path}]},
                    {"role": "assistant", "content": corners[corner]},
                ],
                "answer": corners[corner],
            })  # fmt: skip
        for name, part in (("train.jsonl", rows[: n - n_test]), ("test.jsonl", rows[n - n_test :]), ("sft.jsonl", traces)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in part)
    return out_dir
