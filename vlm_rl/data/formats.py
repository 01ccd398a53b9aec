"""Load prompt datasets in any supported format into one normal form.

Normal form of a sample (a dict):
    prompt      chat messages up to (not including) the answer, e.g.
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]
    images      list of RGB PIL images, one per {"type": "image"} part, in order
    completion  the reference response text, or None when the data has none
    _source     "file:line" of the row, for error messages ("file:line (item i)" in a .json list,
                "dir[split][i]" in a saved dataset)
    ...         every other column of the row (e.g. "answer"), unchanged

Accepted inputs (local only):
    (a) TRL conversational: {"prompt": [messages], "images": [paths|PIL], "completion"?: [messages]|str}
        or {"messages": [...], "images": [...]} (the last assistant turn becomes the completion)
    (b) LLaVA: {"image": path|[paths], "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}
    (c) plain: {"image": path, "prompt": str, "response"?: str, "answer"?: str}
from a .jsonl file, a .json file holding a list, a directory written by `Dataset.save_to_disk`, a directory
holding `{split}.jsonl`/`{split}.json`, or a directory of data files that `datasets.load_dataset` reads. Image paths resolve relative to the
data file (or the dataset directory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_rl.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
ROLE_FROM_LLAVA = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line and field, and what to do.

    `source` ("file:line"), `field` and `detail` (the message without those two) are kept apart too, so that
    `vlm_rl.data.validate` can list problems by row and field."""

    def __init__(self, message: str, source: str | None = None, field: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.source, self.field = source, field
        self.detail = message if detail is None else detail


def _err(where: str, field: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: field '{field}': {problem}. {fix}", where, field, f"{problem}. {fix}")


def located_error(where: str, problem: str) -> DataError:
    """A DataError at `where` ("file:line", or a file) that names no field, e.g. a line that is not JSON."""
    return DataError(f"{where}: {problem}", where, None, problem)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, L, P, CMYK, I;16, ...) -> RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode.startswith("I"):
        # 16-bit (I;16, I;16B, ...; or I holding values above 255) -> 8-bit by the high byte; convert("L") would clip.
        import numpy as np

        values = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(ref: Any, base_dir: Path, where: str, field: str) -> Image.Image:
    """Open a path (relative to `base_dir`), a {"path"|"bytes"} dict or a PIL image as RGB."""
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, dict) and ref.get("bytes") is not None:
        import io

        try:
            return to_rgb(Image.open(io.BytesIO(ref["bytes"])))
        except Exception as e:
            raise _err(where, field, f"image bytes cannot be decoded ({e})", "Re-encode the image as PNG/JPEG.")
    if isinstance(ref, dict):
        ref = ref.get("path")
    if not isinstance(ref, (str, os.PathLike)) or not str(ref):
        raise _err(where, field, f"expected an image path, got {type(ref).__name__}", "Give a path relative to the data file.")
    path = Path(ref) if os.path.isabs(ref) else base_dir / ref
    if not path.exists():
        raise _err(where, field, f"image file {path} does not exist", "Fix the path (relative to the data file) or remove the row.")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:
        raise _err(where, field, f"image file {path} cannot be read ({type(e).__name__}: {e})", "Replace or remove the file.")


def _split_placeholders(text: str) -> list[dict]:
    """'<image>\\nWhat is it?' -> [{"type": "image"}, {"type": "text", "text": "\\nWhat is it?"}] (empty text dropped)."""
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image"})
        chunk = chunk.strip("\n") if i > 0 or chunk.strip() == "" else chunk
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _count_images(messages: list[dict]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image"
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if isinstance(content, dict):
        return _text_of(content.get("content"))
    raise TypeError(f"cannot read text from {type(content).__name__}")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _normalise_messages(messages: Any, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _err(where, field, "expected a non-empty list of chat messages", 'Use [{"role": "user", "content": ...}].')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _err(where, f"{field}[{i}]", "a message needs 'role' and 'content'", "Fix the message.")
        content = m["content"]
        if isinstance(content, str):
            content = _split_placeholders(content) if IMAGE_PLACEHOLDER in content else [{"type": "text", "text": content}]
        elif isinstance(content, list):
            bad = [j for j, p in enumerate(content) if not isinstance(p, dict)]
            if bad:
                raise _err(where, f"{field}[{i}].content[{bad[0]}]", "expected a part like {'type': 'text', 'text': ...}", "Fix the message.")
            # datasets stores parts with all keys (None where absent); keep only the ones that mean something.
            content = [
                {"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p.get("text") or ""}
                for p in content
            ]
        else:
            raise _err(where, f"{field}[{i}].content", f"expected a string or a list of parts, got {type(content).__name__}", "Fix the message.")
        out.append({"role": m["role"], "content": content})
    return out


def normalise_row(row: dict, base_dir: Path, where: str) -> dict:
    """One raw row of any supported format -> the normal form (images still as references)."""
    if not isinstance(row, dict):
        raise _err(where, "<row>", f"expected a JSON object, got {type(row).__name__}", "Each line must be one JSON object.")
    rest = {k: v for k, v in row.items() if k not in ("prompt", "images", "image", "completion", "messages", "conversations", "response")}
    if "conversations" in row:  # (b) LLaVA
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _err(where, "conversations", "expected a non-empty list of turns", 'Use [{"from": "human", "value": "<image>\\n..."}, ...].')
        messages = []
        for i, t in enumerate(turns):
            role = ROLE_FROM_LLAVA.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise _err(where, f"conversations[{i}]", "a turn needs 'from' (human/gpt/system) and a string 'value'", "Fix the turn.")
            messages.append({"role": role, "content": t["value"]})
        image_refs = _as_list(row.get("image"))
        prompt, completion = _split_completion(messages, where, "conversations")
    elif "messages" in row:  # (a) TRL conversational, full conversation
        image_refs = _as_list(row.get("images", row.get("image")))
        prompt, completion = _split_completion(row["messages"], where, "messages")
    elif "prompt" in row and isinstance(row["prompt"], list):  # (a) TRL conversational prompt(-completion)
        image_refs = _as_list(row.get("images", row.get("image")))
        prompt = row["prompt"]
        completion = row.get("completion")
        if completion is not None:
            if isinstance(completion, list) and completion and isinstance(completion[-1], dict) and "content" in completion[-1]:
                completion = completion[-1]["content"]  # a list of messages: the last one's content
            completion = _text_in(completion, where, "completion")
    elif "prompt" in row:  # (c) plain
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise _err(where, "prompt", "expected a non-empty string", "Give the question text.")
        image_refs = _as_list(row.get("image", row.get("images")))
        text = row["prompt"]
        if IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER * len(image_refs) + text
        prompt = [{"role": "user", "content": text}]
        completion = row.get("response", row.get("completion"))
    else:
        raise _err(where, "prompt", "no prompt found (looked for 'prompt', 'messages', 'conversations')", "Use one of the formats in the README.")
    prompt = _normalise_messages(prompt, where, "prompt")
    n_placeholders = _count_images(prompt)
    if n_placeholders != len(image_refs):
        raise _err(
            where,
            "image" if "image" in row else "images",
            f"{len(image_refs)} image(s) but {n_placeholders} image placeholder(s) in the prompt",
            f"Put one {IMAGE_PLACEHOLDER} (or one {{'type': 'image'}} part) per image.",
        )
    if completion is not None and not isinstance(completion, str):
        raise _err(where, "response", f"expected a string, got {type(completion).__name__}", "Give the response text.")
    return {"prompt": prompt, "images": image_refs, "completion": completion, "_source": where, **rest}


def _split_completion(messages: Any, where: str, field: str) -> tuple[list, str | None]:
    if not isinstance(messages, list) or not messages:
        raise _err(where, field, "expected a non-empty list", "Fix the conversation.")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return messages[:-1], _text_in(last.get("content"), where, f"{field}[{len(messages) - 1}].content")
    return messages, None


def _text_in(content: Any, where: str, field: str) -> str:
    try:
        return _text_of(content)
    except TypeError:
        raise _err(where, field, f"expected a string or a list of text parts, got {type(content).__name__}", "Give the response text.") from None


def response_text(value: Any, where: str, field: str, if_missing: str) -> str:
    """A response-like field (a string, or TRL conversational messages) as text; a DataError naming `field` when
    it is missing (`if_missing` says what to do) or holds something else."""
    from reward_models.base import completion_text

    if value is None:
        raise DataError(f"{where}: field '{field}': {if_missing}", where, field, if_missing)
    try:
        return completion_text(value)
    except TypeError as e:
        raise _err(where, field, str(e), "Give a string or a list of assistant messages.") from None


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


class PromptDataset(Sequence):
    """Samples in the normal form; images are opened (and converted to RGB) when a sample is read."""

    def __init__(self, rows: list[dict], base_dir: Path):
        self.rows = rows
        self.base_dir = base_dir

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.rows[i]
        field = "image" if len(row["images"]) <= 1 else "images"
        images = [open_image(ref, self.base_dir, row["_source"], field) for ref in row["images"]]
        return {**row, "images": images}

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def check_images(self) -> None:
        """Open every image once so that a bad file fails now, naming its row, not mid-training."""
        for i in range(len(self)):
            self[i]


@dataclass
class InputRow:
    """One raw row as read, before normalisation: its position, its fields (None when unreadable) and why it
    cannot be used (if so). `line` is the 1-based line of a .jsonl file, the 0-based index in a .json list or
    a dataset directory."""

    line: int
    source: str
    raw: dict | None
    error: DataError | None = None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str, Any, DataError | None]]:
    """(line, "file:line", JSON value, None) per non-blank line of a .jsonl file; (line, "file:line", None, error)
    for a line that is not UTF-8 or not JSON."""
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}). Save the file as UTF-8."
                yield lineno, where, None, located_error(where, problem)
                continue
            if not line.strip():
                continue  # blank lines are not rows
            try:
                yield lineno, where, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, where, None, located_error(where, f"malformed JSON ({e.msg} at column {e.colno}). Fix or remove the line.")


def _utf8_text(path: Path) -> str:
    """The whole file as text; not UTF-8 is a DataError naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise located_error(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[e.start]:02x}). Save the file as UTF-8.") from None


def read_json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:line", raw row) for each row of a .jsonl file or a .json list; malformed JSON is a DataError."""
    if path.suffix == ".jsonl":
        for _, where, row, error in _jsonl_lines(path):
            if error is not None:
                raise error
            yield where, row
    else:
        text = _utf8_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise located_error(f"{path}:{e.lineno}", f"malformed JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(data, list):
            raise located_error(str(path), f"expected a JSON list of samples, got {type(data).__name__}.")
        for i, (lineno, row) in enumerate(zip(_json_list_lines(text), data)):
            yield f"{path}:{lineno} (item {i})", row


def _json_list_lines(text: str) -> Iterator[int]:
    """The line each element of a (valid) top-level JSON list starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        yield text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_dataset_dir(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """("dir[split][i]", raw row) for each row of a dataset directory (save_to_disk output or data files)."""
    import datasets

    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise located_error(str(path), f"no split '{split}' (has {list(ds)}). Pass --split.")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except Exception as e:
            raise located_error(
                str(path), f"datasets.load_dataset cannot read this directory ({type(e).__name__}: {e}). Give the data file itself (.jsonl/.json)."
            ) from None
    for i, row in enumerate(ds):
        yield f"{path}[{split}][{i}]", row


def data_source(path: str | os.PathLike, split: str) -> Path:
    """The file or dataset directory to read: `path` itself, or `path/{split}.jsonl|.json` when `path` is a
    directory of data files named by split (e.g. the synthetic set: DIR/train.jsonl, DIR/test.jsonl)."""
    path = Path(path)
    if not path.exists():
        raise located_error(str(path), "no such file or directory. Give a .jsonl/.json file or a dataset directory.")
    if path.is_dir() and not _is_saved_dataset(path):
        split_files = [path / f"{split}{ext}" for ext in (".jsonl", ".json") if (path / f"{split}{ext}").is_file()]
        if split_files:
            return split_files[0]
    return path


def read_rows(path: str | os.PathLike, split: str = "train") -> tuple[Iterator[InputRow], Path]:
    """(raw rows one at a time, the directory image paths resolve against), for any supported input. Unlike
    `load_samples`, a line of a .jsonl file that is not UTF-8, not JSON or not an object is an error row, and
    reading goes on; a .json list or dataset directory that cannot be read at all is a DataError."""
    path = data_source(path, split)
    if path.is_dir():
        def dataset_rows() -> Iterator[InputRow]:
            for i, (where, row) in enumerate(read_dataset_dir(path, split)):
                yield InputRow(i, where, dict(row))

        return dataset_rows(), path
    if path.suffix == ".json":
        def list_rows() -> Iterator[InputRow]:
            for i, (where, row) in enumerate(read_json_rows(path)):
                yield _input_row(i, where, row, None)

        return list_rows(), path.parent
    if path.suffix != ".jsonl":
        raise located_error(str(path), f"unsupported file type '{path.suffix}'. Use .jsonl, .json or a dataset directory.")
    return (_input_row(*line) for line in _jsonl_lines(path)), path.parent


def _input_row(line: int, where: str, row: Any, error: DataError | None) -> InputRow:
    if error is None and not isinstance(row, dict):
        error = located_error(where, f"expected a JSON object, got {type(row).__name__}. Each line must be one JSON object.")
    return InputRow(line, where, row if error is None else None, error)


def load_samples(path: str | os.PathLike, split: str = "train", check_images: bool = True) -> PromptDataset:
    """Read a dataset of any supported format into normal-form samples (see the module docstring)."""
    rows_in, base_dir = read_rows(path, split)
    rows = []
    for row in rows_in:
        if row.error is not None:
            raise row.error
        rows.append(normalise_row(row.raw, base_dir, row.source))
    if not rows:
        raise DataError(f"{data_source(path, split)}: no samples found.")
    dataset = PromptDataset(rows, base_dir)
    if check_images:
        dataset.check_images()
    return dataset


def prompt_text(messages: list[dict]) -> str:
    """The text of the last user turn, for logs, reports and text-only rewards."""
    users = [m for m in messages if m["role"] == "user"] or messages
    return _text_of(users[-1]["content"])



def reward_kwargs(samples: list[dict], exclude: tuple[str, ...] = ()) -> dict[str, list]:
    """What a reward receives besides prompts and completions: `images` and every other column (TRL's convention),
    `_source` ("file:line") included."""
    columns = [k for k in samples[0] if k not in ("prompt", "images", *exclude)]
    return {"images": [s["images"] for s in samples], **{k: [s.get(k) for s in samples] for k in columns}}
