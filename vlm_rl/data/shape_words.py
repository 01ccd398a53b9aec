"""The words and colours of the synthetic shapes scenes, shared by the pictures (`synthetic`), the clips
(`synthetic_clips`), the zoom scenes (`zoom_task`) and the tiny models' tokenizer (`models/tiny`); and how each
shape is drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["square", "circle", "triangle"]
POSITIONS = ["left", "right", "top", "bottom"]
COUNT_WORDS = ["one", "two", "three", "four"]

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, side: float) -> None:
    """A `shape` of `colour` with sides `side` centred at (cx, cy): a square, a circle, or a triangle pointing up."""
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = RGB[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
