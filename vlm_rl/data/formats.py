"""Load a dataset of any supported format into one normal form: what every command reads.

Normal form of a sample (a dict):
    prompt      chat messages up to (not including) the answer, e.g.
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]
                (content parts are text or {"type": "image"} placeholders; earlier turns of a conversation,
                assistant answers included, stay in it)
    images      one RGB PIL image per {"type": "image"} part, in order (`ImageRef`s until the sample is read)
    videos      one `vlm_rl.data.videos.Video` (sampled, sized frames) per {"type": "video"} part, in order
                (`VideoRef`s until the sample is read)
    completion  the reference response (the last assistant turn, `completion` or `response`), or None
    _source     "file:line" of the row, for error messages ("file:line (item i)" in a .json list, "file[i]" in a
                table, "dir[split][i]" in a dataset directory)
    ...         every other column of the row (e.g. "answer"), unchanged, after `--column_map`

The formats (TRL, LLaVA, plain, OpenAI and Qwen messages) are `vlm_rl.data.parts`; the files and folders
(.jsonl, .json, .csv, .parquet, .arrow, dataset directories) `vlm_rl.data.readers`; how images are read and sized
(qwen-vl-utils for Qwen models) `vlm_rl.data.images`, and videos (decoded, sampled and sized by qwen-vl-utils)
`vlm_rl.data.videos`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_rl.data.errors import DataError, field_error
from vlm_rl.data.images import ImageResize, open_image, to_rgb
from vlm_rl.data.parts import normalise_row, text_of
from vlm_rl.data.readers import InputRow, data_source, read_rows
from vlm_rl.data.videos import open_video

# What the commands import from here besides what is defined here: the normal form's building blocks.
__all__ = [
    "DataError", "ImageResize", "InputRow", "PromptDataset", "load_samples", "normalise_row", "open_image", "open_video",
    "prompt_text", "read_rows", "response_field", "response_text", "reward_columns_of", "reward_kwargs", "to_rgb",
]


def response_text(value: Any, where: str, field: str, if_missing: str) -> str:
    """A response-like field (a string, or TRL conversational messages) as text; a DataError naming `field` when
    it is missing (`if_missing` says what to do) or holds something else."""
    from reward_models.base import completion_text

    if value is None:
        raise DataError(f"{where}: field '{field}': {if_missing}", where, field, if_missing)
    try:
        return completion_text(value)
    except TypeError as e:
        raise field_error(where, field, str(e), "Give a string or a list of assistant messages.") from None


def response_field(raw: dict, sample: dict, column: str) -> tuple[str, Any, str]:
    """(field, value, what to do when it is missing) of the response to score: the normal form's completion
    for `column` response/completion, else `raw[column]`."""
    field = "response" if column in ("response", "completion") else column
    value = sample.get("completion") if field == "response" else raw.get(column)
    if_missing = (
        f"missing response to score. Give a '{field}' column"
        + (" (or a final assistant/gpt turn)" if field == "response" else "")
        + ", or name another column with --response-column."
    )
    return field, value, if_missing


ORIGINAL_IMAGES = "_original_images"  # a sample's images as the data holds them, before the model's sizing


class OriginalImages(Sequence):
    """A sample's images at the resolution the data holds them (what a tool such as `zoom` crops), opened when read."""

    def __init__(self, refs: list, base_dir: Path, source: str):
        self.refs, self.base_dir, self.source = refs, base_dir, source

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return open_image(self.refs[i], self.base_dir, self.source)


class PromptDataset(Sequence):
    """Samples in the normal form; images and videos are opened (RGB, sized by `resize` and its `video` bounds when
    given) when a sample is read."""

    def __init__(self, rows: list[dict], base_dir: Path, resize: ImageResize | None = None):
        self.rows = rows
        self.base_dir = base_dir
        self.resize = resize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.rows[i]
        videos = self.resize.video if self.resize is not None else None
        sample = {
            **row,
            "images": [open_image(ref, self.base_dir, row["_source"], self.resize) for ref in row["images"]],
            "videos": [open_video(ref, self.base_dir, row["_source"], videos) for ref in row.get("videos", ())],
        }
        if self.resize is not None:  # the sized images differ from the data's: a tool may want the data's (`zoom`)
            sample[ORIGINAL_IMAGES] = OriginalImages(row["images"], self.base_dir, row["_source"])
        return sample

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def has_videos(self) -> bool:
        """Whether any row holds a video (read from the rows: nothing is opened)."""
        return any(row.get("videos") for row in self.rows)

    def check_images(self) -> None:
        """Open every image and video once so that a bad file fails now, naming its row, not mid-training."""
        for i in range(len(self)):
            self[i]


def load_samples(
    path: str | os.PathLike,
    split: str = "train",
    check_images: bool = True,
    column_map: str | Mapping[str, str] | None = None,
    resize: ImageResize | None = None,
    skip: Collection[str] = (),
) -> PromptDataset:
    """Read a dataset of any supported format into normal-form samples (see the module docstring). `skip`: the
    sources ("file:line") of rows to leave out (the bad rows `--skip_bad_rows` skips); any other bad row is a
    DataError."""
    rows_in, base_dir = read_rows(path, split, column_map)
    rows = []
    for row in rows_in:
        if row.source in skip:
            continue
        if row.error is not None:
            raise row.error
        rows.append(normalise_row(row.fields, row.source))
    if not rows:
        raise DataError(f"{data_source(path, split)}: no samples found.")
    dataset = PromptDataset(rows, base_dir, resize)
    if check_images:
        dataset.check_images()
    return dataset


def prompt_text(messages: list[dict]) -> str:
    """The text of the last user turn, for logs, reports and text-only rewards."""
    users = [m for m in messages if m["role"] == "user"] or messages
    return text_of(users[-1]["content"])


MEDIA_COLUMNS = ("prompt", "images", "videos", ORIGINAL_IMAGES)  # not dataset columns: what a reward gets apart from those, and the tools' originals


def reward_columns_of(sample: dict) -> set[str]:
    """The columns a reward receives with this sample (`reward_kwargs`); the normal form's `completion` only when
    the row has a reference response."""
    return {k for k, v in sample.items() if k not in MEDIA_COLUMNS and not (k == "completion" and v is None)}


def reward_kwargs(samples: list[dict], exclude: tuple[str, ...] = ()) -> dict[str, list]:
    """What a reward receives besides prompts and completions: `images`, `videos` (one list of `Video`s per sample)
    when a sample of the batch has one, and every other column (TRL's convention), `_source` ("file:line") included."""
    columns = [k for k in samples[0] if k not in (*MEDIA_COLUMNS, *exclude)]
    videos = {"videos": [s.get("videos") or [] for s in samples]} if any(s.get("videos") for s in samples) else {}
    return {"images": [s["images"] for s in samples], **videos, **{k: [s.get(k) for s in samples] for k in columns}}
