"""Rows of every supported format -> the normal form: chat messages whose content parts are text or vision
placeholders, the sample's images in placeholder order, and the reference response.

Content parts (a `datasets` column gives every part every key, None where absent: None values are ignored):

    {"type": "text", "text": "..."}                                  text
    {"type": "image"}                                                TRL: the next entry of the `images`/`image` column
    {"type": "image", "image": SOURCE, "max_pixels": N, ...}         Qwen (qwen-vl-utils; also without "type")
    {"type": "image", "url" | "path": SOURCE}                        transformers' chat-template parts
    {"type": "image_url", "image_url": {"url": SOURCE}}              OpenAI (or "image_url": SOURCE)
    {"type": "video"}                                                TRL: the next entry of the `videos`/`video` column
    {"type": "video", "video": VIDEO, "fps": 2, "max_pixels": N, ...} Qwen (qwen-vl-utils; also without "type")

and, in a string content, each `<image>` (`<video>`) is a TRL placeholder. SOURCE is any `vlm_rl.data.images.ImageRef`
source, VIDEO any `vlm_rl.data.videos.VideoRef` source (a file, a directory of frames, a list of frames). A part of
any other type is a DataError naming the file, line, field and type: a part is loaded or named, never dropped. In
the normal form every vision part is a bare placeholder (`{"type": "image"}`, `{"type": "video"}`: what chat
templates read), `images` holds one `ImageRef` per image placeholder and `videos` one `VideoRef` per video
placeholder, in order.

Vision kinds (`MEDIA`): a kind is a placeholder type, the normal form's list of them, the columns and the text
placeholder that give them, the keys a part carries its source under, and the options a part may carry; parsing,
the placeholder counts and the normal form's lists run over every kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlm_rl.data.errors import DataError, field_error
from vlm_rl.data.images import RESIZE_OPTIONS, ImageRef
from vlm_rl.data.videos import VIDEO_OPTIONS, VideoRef

ROLE_FROM_LLAVA = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Columns the normal form consumes; every other column of a row is kept as it is (e.g. "answer").
FORMAT_COLUMNS = ("prompt", "images", "image", "videos", "video", "completion", "messages", "conversations", "response")


@dataclass(frozen=True)
class MediaKind:
    """A kind of vision input: `{"type": name}` placeholders in the normal form, listed in order in `sample[column]`."""

    name: str  # the placeholder part's type
    column: str  # the normal form's list of references, one per placeholder
    data_columns: tuple[str, ...]  # the row's columns that give the references of bare placeholders
    text_placeholder: str  # the placeholder inside string content (LLaVA, plain prompts)
    part_types: tuple[str, ...]  # part types of this kind (OpenAI's "image_url" is an image)
    source_keys: tuple[str, ...]  # keys an inline part carries its source under
    options: tuple[str, ...]  # the per-item options an inline part may carry (qwen-vl-utils' names)
    ref: type  # the reference the normal form keeps per item until the sample is read


IMAGE = MediaKind("image", "images", ("images", "image"), "<image>", ("image", "image_url"), ("image", "url", "path"), RESIZE_OPTIONS, ImageRef)
VIDEO = MediaKind("video", "videos", ("videos", "video"), "<video>", ("video",), ("video", "url", "path"), VIDEO_OPTIONS, VideoRef)
MEDIA = {IMAGE.name: IMAGE, VIDEO.name: VIDEO}
IMAGE_PLACEHOLDER = IMAGE.text_placeholder
_PLACEHOLDERS = re.compile("|".join(re.escape(k.text_placeholder) for k in MEDIA.values()))
_UNSUPPORTED = {"input_audio": "audio is not supported"}


def _kind_of_part(part: dict) -> str | None:
    """A part's type; qwen-vl-utils also accepts a part without one ({"image": ...})."""
    if part.get("type") is not None:
        return str(part["type"])
    return next((key for key in ("text", *(k.name for k in MEDIA.values())) if key in part), None)


def _vision_part(kind: MediaKind, part: dict, where: str, field: str) -> ImageRef | VideoRef | None:
    """The reference an inline part carries, or None for a bare placeholder (its image is in the kind's column)."""
    if part.get("type") == "image_url" or "image_url" in part:  # OpenAI
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise field_error(where, field, "an image_url part needs image_url.url (a path, file:// or data:image URI)",
                              'Write {"type": "image_url", "image_url": {"url": "imgs/0.png"}}.')
        return ImageRef(url, field_name=field)
    source = next((part[key] for key in kind.source_keys if part.get(key) is not None), None)
    options = {key: part[key] for key in kind.options if part.get(key) is not None}
    if source is None:
        if options:
            raise field_error(where, field, f"options {sorted(options)} on a part without its own {kind.name}",
                              f'Put the {kind.name} in the part: {{"type": "{kind.name}", "{kind.name}": SOURCE, ...}}.')
        return None
    return kind.ref(source, options, field)


def _parts(content: list, where: str, field: str) -> list[tuple[dict, ImageRef | VideoRef | None]]:
    """Each part as (normal-form part, its inline reference or None)."""
    out = []
    for j, raw in enumerate(content):
        here = f"{field}[{j}]"
        if not isinstance(raw, dict):
            raise field_error(where, here, "expected a part like {'type': 'text', 'text': ...}", "Fix the message.")
        part = {k: v for k, v in raw.items() if v is not None}  # datasets' absent keys
        kind_name = _kind_of_part(part)
        if kind_name == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                raise field_error(where, here, f"a text part's text must be a string, got {type(text).__name__}", "Fix the part.")
            out.append(({"type": "text", "text": text}, None))
            continue
        kind = next((k for k in MEDIA.values() if kind_name in k.part_types), None)
        if kind is None:
            why = _UNSUPPORTED.get(str(kind_name), f"content part of type {kind_name!r} is not understood")
            known = sorted({"text", *(t for k in MEDIA.values() for t in k.part_types)})
            raise field_error(where, here, f"{why} (parts may be {', '.join(known)})", "Convert or remove the part.")
        out.append(({"type": kind.name}, _vision_part(kind, part, where, here)))
    return out


def _split_placeholders(text: str) -> list[dict]:
    """'<image>\\nWhat is it?' -> [{"type": "image"}, {"type": "text", "text": "What is it?"}] (empty text dropped);
    `<video>` likewise."""
    parts: list[dict] = []
    kinds = [None] + [next(k.name for k in MEDIA.values() if k.text_placeholder == m.group()) for m in _PLACEHOLDERS.finditer(text)]
    for i, (kind, chunk) in enumerate(zip(kinds, _PLACEHOLDERS.split(text))):
        if kind is not None:
            parts.append({"type": kind})
        chunk = chunk.strip("\n") if i > 0 or chunk.strip() == "" else chunk
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def normalise_messages(messages: Any, where: str, field: str) -> tuple[list[dict], dict[str, list[ImageRef | VideoRef | None]]]:
    """Chat messages -> (normal-form messages, {kind: one entry per placeholder of that kind, in order: its inline
    reference, or None when the row's column gives it})."""
    if not isinstance(messages, list) or not messages:
        raise field_error(where, field, "expected a non-empty list of chat messages", 'Use [{"role": "user", "content": ...}].')
    out, refs = [], {kind: [] for kind in MEDIA}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise field_error(where, f"{field}[{i}]", "a message needs 'role' and 'content'", "Fix the message.")
        content = m["content"]
        if isinstance(content, str):
            parts = _split_placeholders(content) if _PLACEHOLDERS.search(content) else [{"type": "text", "text": content}]
            parsed = [(p, None) for p in parts]
        elif isinstance(content, list):
            parsed = _parts(content, where, f"{field}[{i}].content")
            parts = [p for p, _ in parsed]
        else:
            raise field_error(where, f"{field}[{i}].content", f"expected a string or a list of parts, got {type(content).__name__}", "Fix the message.")
        for part, ref in parsed:
            if part["type"] in refs:
                refs[part["type"]].append(ref)
        out.append({"role": m["role"], "content": parts})
    return out, refs


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def text_of(content: Any) -> str:
    """The text of a message content (a string, a list of parts, or a message)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    if isinstance(content, dict):
        return text_of(content.get("content"))
    raise TypeError(f"cannot read text from {type(content).__name__}")


def _answer_text(content: Any, where: str, field: str) -> str:
    """The text of an answer (a reference response): a string, or text parts only."""
    if isinstance(content, list) and any(isinstance(p, dict) and _kind_of_part({k: v for k, v in p.items() if v is not None}) not in ("text", None) for p in content):
        raise field_error(where, field, "the reference response holds a non-text part", "Answers are text; move images into the prompt.")
    try:
        return text_of(content)
    except TypeError:
        raise field_error(where, field, f"expected a string or a list of text parts, got {type(content).__name__}", "Give the response text.") from None


def _split_completion(messages: Any, where: str, field: str) -> tuple[list, str | None]:
    """A whole conversation -> (the prompt, the last assistant turn's text or None)."""
    if not isinstance(messages, list) or not messages:
        raise field_error(where, field, "expected a non-empty list", "Fix the conversation.")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return messages[:-1], _answer_text(last.get("content"), where, f"{field}[{len(messages) - 1}].content")
    return messages, None


def _llava_messages(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise field_error(where, "conversations", "expected a non-empty list of turns", 'Use [{"from": "human", "value": "<image>\\n..."}, ...].')
    messages = []
    for i, t in enumerate(turns):
        role = ROLE_FROM_LLAVA.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise field_error(where, f"conversations[{i}]", "a turn needs 'from' (human/gpt/system) and a string 'value'", "Fix the turn.")
        messages.append({"role": role, "content": t["value"]})
    return messages


QUESTION_COLUMNS = ("question", "query", "instruction", "problem", "input", "text")


def _no_prompt(row: dict, where: str) -> DataError:
    others = [k for k in row if k not in FORMAT_COLUMNS]
    texts = [k for k in others if isinstance(row[k], str)]
    example = next((k for k in texts if k.lower() in QUESTION_COLUMNS), texts[0] if texts else None)
    hint = f" The row has {others}: map one with --column_map COLUMN=prompt" + (f" (e.g. {example}=prompt)." if example else ".") if others else ""
    return field_error(where, "prompt", "no prompt found (looked for 'prompt', 'messages', 'conversations')",
                       "Use one of the formats in the README." + hint)


def _data_column(kind: MediaKind, row: dict) -> str | None:
    """The row's column giving the kind's bare placeholders (`images`, else `image`), if it has one."""
    return next((c for c in kind.data_columns if row.get(c) is not None), None)


def _column_entries(kind: MediaKind, row: dict) -> tuple[str | None, list]:
    """(the column giving the kind's bare placeholders, its entries): `images`/`image` and `videos` hold a list or
    one item; `video` holds one video (a path, or a list of its frames)."""
    column = _data_column(kind, row)
    if column is None:
        return None, []
    return column, [row[column]] if kind is VIDEO and column == "video" else _as_list(row[column])


def _fill_placeholders(kind: MediaKind, refs: list[ImageRef | VideoRef | None], row: dict, where: str) -> list[ImageRef | VideoRef]:
    """Bare placeholders take the kind's column entries in order; the counts must match."""
    column, given = _column_entries(kind, row)
    bare = sum(ref is None for ref in refs)
    if len(given) != bare:
        inline = len(refs) - bare
        also = f" ({inline} more part(s) carry their own {kind.name})" if inline else ""
        raise field_error(
            where, column or (kind.data_columns[-1] if kind.data_columns[-1] in row else kind.data_columns[0]),
            f"{len(given)} {kind.name}(s) but {bare} {kind.name} placeholder(s) in the prompt{also}",
            f"Put one {kind.text_placeholder} (or one {{'type': '{kind.name}'}} part) per {kind.name} of the column.",
        )
    names = [column] if len(given) == 1 else [f"{column}[{j}]" for j in range(len(given))]
    entries = iter(kind.ref(source, field_name=name) for source, name in zip(given, names))
    return [ref if ref is not None else next(entries) for ref in refs]


def normalise_row(row: dict, where: str) -> dict:
    """One raw row of any supported format -> the normal form (images as `ImageRef`s, opened later against the
    data file's directory); `where` ("file:line") names the row in errors."""
    if not isinstance(row, dict):
        raise field_error(where, "<row>", f"expected a JSON object, got {type(row).__name__}", "Each line must be one JSON object.")
    rest = {k: v for k, v in row.items() if k not in FORMAT_COLUMNS}
    if "conversations" in row:  # LLaVA / ShareGPT
        prompt, completion = _split_completion(_llava_messages(row["conversations"], where), where, "conversations")
        field = "conversations"
    elif "messages" in row:  # a whole conversation: TRL, OpenAI, Qwen
        prompt, completion = _split_completion(row["messages"], where, "messages")
        field = "messages"
    elif "prompt" in row and isinstance(row["prompt"], list):  # TRL prompt(-completion)
        prompt, completion, field = row["prompt"], row.get("completion"), "prompt"
        if isinstance(completion, list) and completion and isinstance(completion[-1], dict) and "content" in completion[-1]:
            completion = completion[-1]["content"]  # a list of messages: the last one's content
        if completion is not None:
            completion = _answer_text(completion, where, "completion")
    elif "prompt" in row:  # plain
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise field_error(where, "prompt", "expected a non-empty string", "Give the question text.")
        text = row["prompt"]
        for kind in reversed(MEDIA.values()):  # a plain prompt without placeholders: images first, then videos
            if kind.text_placeholder not in text:
                text = kind.text_placeholder * len(_column_entries(kind, row)[1]) + text
        prompt, completion, field = [{"role": "user", "content": text}], row.get("response", row.get("completion")), "prompt"
    else:
        raise _no_prompt(row, where)
    messages, refs = normalise_messages(prompt, where, field)
    if completion is not None and not isinstance(completion, str):
        raise field_error(where, "response", f"expected a string, got {type(completion).__name__}", "Give the response text.")
    media = {kind.column: _fill_placeholders(kind, refs[name], row, where) for name, kind in MEDIA.items()}
    return {"prompt": messages, **media, "completion": completion, "_source": where, **rest}
