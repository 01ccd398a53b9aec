"""The words and colours of the synthetic shapes scenes, shared by the pictures (`synthetic`), the clips
(`synthetic_clips`) and the tiny models' tokenizer (`models/tiny`)."""

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
