"""Reading rows from files and folders, one at a time, each named by "file:line" (or "file[i]"), with `--column_map`.

Inputs (local only):
    .jsonl              one JSON object per line                               rows named FILE:LINE
    .json               a JSON list of objects                                 FILE:LINE (item I)
    .csv                a header line, then one row per line (every value a string; an empty cell is absent)
                                                                               FILE:LINE
    .parquet, .arrow    a table (Arrow IPC file or stream, as `save_to_disk` writes)   FILE[I]
    a directory         written by `Dataset(Dict).save_to_disk`, or holding `{split}.jsonl`/`{split}.json`, or data
                        files that `datasets.load_dataset` reads (e.g. parquet shards)  DIR[SPLIT][I]
`--split` picks the split of a directory; a single file is one split. Images stored in a table (datasets' `Image`
feature, `{"bytes", "path"}`) are read as stored, never decoded here; image paths resolve against the data file's
directory (a directory: itself).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_rl.data.errors import DataError, located_error

_BATCH = 256


# ----------------------------------------------------------------------------------------- --column_map


def parse_column_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"question=prompt,img=image"` (or a YAML mapping) -> {"question": "prompt", "img": "image"}."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in str(value).split(","):
            source, sep, target = item.partition("=")
            if not sep or not source.strip() or not target.strip():
                raise DataError(f"--column_map: expected SOURCE=TARGET pairs separated by commas (e.g. question=prompt,img=image), got {item!r}")
            pairs.append((source.strip(), target.strip()))
    mapping = dict(pairs)
    if len(mapping) != len(pairs) or len(set(mapping.values())) != len(mapping):
        raise DataError(f"--column_map: a column appears twice in {value!r}")
    return mapping


def column_map_option(value: str | Mapping[str, str] | None) -> str | None:
    """A config's `column_map` (a string, or a mapping from YAML) checked and written as "SOURCE=TARGET,..."."""
    mapping = parse_column_map(value)
    return ",".join(f"{s}={t}" for s, t in mapping.items()) or None


def _mapped(row: dict, column_map: dict[str, str], where: str) -> dict:
    """`row` with its columns renamed; a column_map target the row already has (besides its source) is an error."""
    if not column_map:
        return row
    clash = [t for s, t in column_map.items() if s in row and t in row and t not in column_map]
    if clash:
        raise located_error(where, f"--column_map renames a column to {clash[0]!r}, which the row already has. Map that one away too, or drop it.")
    return {column_map.get(k, k): v for k, v in row.items()}


# ----------------------------------------------------------------------------------------- rows


@dataclass
class InputRow:
    """One row as read: its position, its fields as stored (`raw`, None when unreadable), the same after
    `--column_map` (`fields`: what the normal form reads) and why it cannot be used (if so). `line` is the 1-based
    line of a .jsonl/.csv file, else the 0-based index (in a .json list, a table, a dataset directory)."""

    line: int
    source: str
    raw: dict | None
    error: DataError | None = None
    fields: dict | None = None

    def __post_init__(self):
        if self.fields is None:
            self.fields = self.raw


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


def _json_list_rows(path: Path) -> Iterator[tuple[int, str, Any, DataError | None]]:
    """(index, "file:line (item i)", row, None) for each element of a .json list; the file as a whole must parse."""
    text = _utf8_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise located_error(f"{path}:{e.lineno}", f"malformed JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(data, list):
        raise located_error(str(path), f"expected a JSON list of samples, got {type(data).__name__}.")
    for i, (lineno, row) in enumerate(zip(_json_list_lines(text), data)):
        yield i, f"{path}:{lineno} (item {i})", row, None


def _csv_rows(path: Path) -> Iterator[tuple[int, str, Any, DataError | None]]:
    """(line, "file:line", row, None) per record of a CSV file with a header; values are strings, empty cells absent."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise located_error(str(path), f"not UTF-8 text ({e.reason}). Save the file as UTF-8.") from None
        start = reader.line_num + 1
        try:
            for record in reader:
                where = f"{path}:{start}"
                if any(cell.strip() for cell in record):
                    if len(record) != len(header):
                        yield start, where, None, located_error(where, f"{len(record)} values for {len(header)} columns {header}. Fix the line.")
                    else:
                        yield start, where, {k: v for k, v in zip(header, record) if v != ""}, None
                start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise located_error(f"{path}:{start}", f"not UTF-8 text ({e.reason}). Save the file as UTF-8.") from None


def _table_batches(path: Path):
    """The record batches of a .parquet or .arrow (IPC file or stream) file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.ParquetFile(path).iter_batches(batch_size=_BATCH)
        try:
            return iter(pa.ipc.open_file(path).read_all().to_batches(_BATCH))
        except pa.ArrowInvalid:
            return iter(pa.ipc.open_stream(path).read_all().to_batches(_BATCH))
    except (pa.ArrowException, OSError) as e:
        raise located_error(str(path), f"cannot be read as a {path.suffix[1:]} table ({type(e).__name__}: {e}).") from None


def _table_rows(batches, name: str) -> Iterator[tuple[int, str, Any, DataError | None]]:
    """(index, "NAME[i]", row, None) per row of Arrow record batches: values as stored (images not decoded)."""
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield i, f"{name}[{i}]", row, None
            i += 1


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _dataset_dir_rows(path: Path, split: str) -> Iterator[tuple[int, str, Any, DataError | None]]:
    """(index, "dir[split][i]", row, None) for each row of a dataset directory (save_to_disk output or data files)."""
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
                str(path), f"datasets.load_dataset cannot read this directory ({type(e).__name__}: {e}). Give the data file itself."
            ) from None
    yield from _table_rows(ds.with_format("arrow").iter(batch_size=_BATCH), f"{path}[{split}]")


def data_source(path: str | os.PathLike, split: str) -> Path:
    """The file or dataset directory to read: `path` itself, or `path/{split}.jsonl|.json` when `path` is a
    directory of data files named by split (e.g. the synthetic set: DIR/train.jsonl, DIR/test.jsonl)."""
    path = Path(path)
    if not path.exists():
        raise located_error(str(path), f"no such file or directory. Give a {'/'.join(FILE_READERS)} file or a dataset directory.")
    if path.is_dir() and not _is_saved_dataset(path):
        split_files = [path / f"{split}{ext}" for ext in (".jsonl", ".json") if (path / f"{split}{ext}").is_file()]
        if split_files:
            return split_files[0]
    return path


def _table_file_rows(path: Path) -> Iterator[tuple[int, str, Any, DataError | None]]:
    return _table_rows(_table_batches(path), str(path))


# The reader of each single-file type: (line or index, "file:line", row, error) per row.
FILE_READERS = {".jsonl": _jsonl_lines, ".json": _json_list_rows, ".csv": _csv_rows, ".parquet": _table_file_rows, ".arrow": _table_file_rows}


def read_rows(path: str | os.PathLike, split: str = "train", column_map: str | Mapping[str, str] | None = None) -> tuple[Iterator[InputRow], Path]:
    """(rows one at a time, the directory image paths resolve against), for any supported input. A row that is
    not UTF-8, not JSON or not an object is an error row, and reading goes on; a file that cannot be read at all is
    a DataError (raised while iterating). `column_map` renames columns ({source: target}); a source that no row
    has is a DataError at the end."""
    path = data_source(path, split)
    mapping = parse_column_map(column_map)
    if not path.is_dir() and path.suffix not in FILE_READERS:
        raise located_error(str(path), f"unsupported file type '{path.suffix}'. Use {', '.join(FILE_READERS)} or a dataset directory.")
    raw_rows = _dataset_dir_rows(path, split) if path.is_dir() else FILE_READERS[path.suffix](path)

    def rows() -> Iterator[InputRow]:
        seen: set[str] = set()
        for line, where, raw, error in raw_rows:
            if error is None and not isinstance(raw, dict):
                error = located_error(where, f"expected a JSON object, got {type(raw).__name__}. Each line must be one JSON object.")
            if error is not None:
                yield InputRow(line, where, None, error)
                continue
            seen.update(raw)
            try:
                yield InputRow(line, where, raw, fields=_mapped(raw, mapping, where))
            except DataError as e:
                yield InputRow(line, where, raw, e)
        unknown = [s for s in mapping if s not in seen]
        if unknown and seen:
            raise located_error(str(path), f"--column_map names {unknown}, which no row has (columns: {sorted(seen)}). Fix the map.")

    return rows(), path if path.is_dir() else path.parent
