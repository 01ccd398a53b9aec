"""Synthetic video questions: short clips of the shapes scenes whose one-word answers need more than one frame.

`motion`: one shape starts at the centre of the canvas and moves to the left, right, top or bottom ("Which side
does the red square move to?"; the four sides are single tokens of the tiny tokenizer, as the image tasks' words are). `appear`: three shapes of different colours appear one after another on an empty canvas, each in its own quarter
("Which colour appears last?"). In both, the first frame is the same whatever the answer (the shape at the centre
whatever its direction; an empty canvas), so a model shown only the first frame is at chance; the answer is in how
the frames differ.

Each clip is written twice: as an mp4 (H.264, lossless RGB, `FPS` frames per second, so that qwen-vl-utils' default
sampling of 2 frames per second takes every frame) and as a directory of PNG frames; both decode to the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_rl.data.shape_words import COLOURS, POSITIONS, SHAPES, draw_shape

CLIP_TASKS = ["motion", "appear"]
DIRECTIONS = POSITIONS  # left, right, top, bottom: the side a moving shape moves to
FRAMES = 8  # 4 temporal patches of 2 frames
FPS = 2  # qwen-vl-utils samples 2 frames per second by default: every frame of these clips
SIZE = 56  # pixels per side: 2x2 vision tokens per temporal patch for a 14-px patch, 16 tokens per clip
STEP = 3  # pixels a moving shape travels per frame (21 in all: it ends at the edge)
SIDE = 12  # a shape's side in pixels
BACKGROUND = (250, 250, 250)
_MOVES = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
_QUARTERS = [(14, 14), (42, 14), (14, 42), (42, 42)]  # centres of the four quarters (one merged vision token each)

CLIP_QUESTIONS = {
    "motion": "Which side does the {colour} {shape} move to: left, right, top or bottom? Answer with one word.",
    "appear": "Which colour appears last? Answer with one word.",
}


@dataclass(frozen=True)
class Clip:
    """A clip's content: for `motion`, one shape (colours[0], shapes[0]) and its `direction`; for `appear`, three
    shapes in order of appearance at `places` (quarter indices), appearing at frames `starts` (the first at frame 1:
    frame 0 is empty)."""

    task: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    direction: str = ""
    places: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    jitter: tuple[int, int] = (0, 0)  # the motion's start, off the centre by this many pixels

    def answer(self) -> str:
        return self.direction if self.task == "motion" else self.colours[-1]

    def choices(self) -> list[str]:
        return DIRECTIONS if self.task == "motion" else COLOURS

    def question(self) -> str:
        return CLIP_QUESTIONS[self.task].format(colour=self.colours[0], shape=self.shapes[0])


def random_clip(task: str, rng: random.Random) -> Clip:
    if task == "motion":
        jitter = (rng.randint(-1, 1), rng.randint(-1, 1))
        return Clip(task, (rng.choice(COLOURS),), (rng.choice(SHAPES),), direction=rng.choice(DIRECTIONS), jitter=jitter)
    if task == "appear":
        second = 1 + rng.randint(2, 3)
        return Clip(
            task, tuple(rng.sample(COLOURS, 3)), tuple(rng.choice(SHAPES) for _ in range(3)),
            places=tuple(rng.sample(range(4), 3)), starts=(1, second, second + rng.randint(2, 3)),
        )
    raise ValueError(f"unknown clip task {task!r}; choose from {CLIP_TASKS}")


def draw_clip(clip: Clip) -> list[Image.Image]:
    """The clip's `FRAMES` frames, `SIZE` x `SIZE` RGB."""
    frames = []
    for t in range(FRAMES):
        image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        if clip.task == "motion":
            dx, dy = _MOVES[clip.direction]
            cx = SIZE / 2 + clip.jitter[0] + dx * STEP * t
            cy = SIZE / 2 + clip.jitter[1] + dy * STEP * t
            draw_shape(draw, clip.shapes[0], clip.colours[0], cx, cy, SIDE)
        else:
            for colour, shape, place, start in zip(clip.colours, clip.shapes, clip.places, clip.starts):
                if t >= start:
                    draw_shape(draw, shape, colour, *_QUARTERS[place], SIDE)
        frames.append(image)
    return frames


def write_mp4(frames: list[Image.Image], path: Path, fps: int = FPS) -> None:
    """`frames` as an H.264 mp4 in lossless RGB (libx264rgb, crf 0): it decodes to exactly these pixels."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_clip(clip: Clip, root: Path, name: str) -> tuple[str, str]:
    """Write the clip as `clips/NAME.mp4` and `frames/NAME/NN.png` under `root`; (mp4 path, frames directory),
    relative to `root`."""
    frames = draw_clip(clip)
    mp4, folder = f"clips/{name}.mp4", f"frames/{name}"
    (root / folder).mkdir(parents=True)
    (root / "clips").mkdir(exist_ok=True)
    for t, frame in enumerate(frames):
        frame.save(root / folder / f"{t:02d}.png")
    write_mp4(frames, root / mp4)
    return mp4, folder
