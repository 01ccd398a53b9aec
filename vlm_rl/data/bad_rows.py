"""Rows a run leaves out with `--skip_bad_rows` (`vlm_rl.data.validate.DataReport.rows_to_skip` decides which, or
stops the run), and `skipped_rows.jsonl`, which names each one beside the run's outputs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlm_rl.atomic import atomic_file

SKIPPED_ROWS_FILE = "skipped_rows.jsonl"


@dataclass
class BadRows:
    """The rows of one data file that a run leaves out: one record each, {"file", "line", "source", "reason"}."""

    file: str
    rows: int
    records: list[dict] = field(default_factory=list)

    @property
    def sources(self) -> set[str]:
        """The skipped rows as `_source` names them ("file:line"), for `load_samples(skip=...)`."""
        return {r["source"] for r in self.records}


def skipped_rows_jsonl(bad: Sequence[BadRows]) -> str:
    """The text of `skipped_rows.jsonl`: one JSON line per skipped row ("" when none was skipped)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for b in bad for r in b.records)


def announce_skipped(bad: Sequence[BadRows], path: str | os.PathLike) -> None:
    """One console line per data file with skipped rows, naming the file that lists them."""
    for b in bad:
        if b.records:
            print(f"--skip_bad_rows: skipped {len(b.records)} of {b.rows} rows of {b.file} (each named in {path})", flush=True)


def write_skipped_rows(out_dir: str | os.PathLike, bad: Sequence[BadRows], name: str = SKIPPED_ROWS_FILE) -> Path | None:
    """`out_dir/skipped_rows.jsonl` (or `name`; written atomically) and a count per file on the console; None
    (and no file) when no row was skipped."""
    text = skipped_rows_jsonl(bad)
    if not text:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(text)
    announce_skipped(bad, path)
    return path
