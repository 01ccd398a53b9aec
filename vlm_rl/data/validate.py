"""Check a dataset for a task before any model loads, and list every problem by file, line and field.

    vlm-rl validate-data FILE [--task ppo|sft|reward|score] [--model DIR] [--max_prompt_length N] [--reward SPEC ...]
                              [--column_map SOURCE=TARGET,...] [--skip_bad_rows] [--show N]

`check_data` reads every row (the readers of `vlm_rl.data.formats`, so the same formats and the same normal form) and
collects, instead of stopping at the first:
  * the file: missing, unsupported type, empty, or unreadable as a whole (a .json list that is not JSON);
  * each row: not UTF-8, not JSON, not an object, no prompt, bad messages, image (video) placeholders that do not
    match the images (videos) (`<image>` or `{"type": "image"}` parts, `<video>` or `{"type": "video"}`), images that do
    not exist or cannot be opened, videos that cannot be decoded, sampled or sized (qwen-vl-utils), videos for a model
    whose processor takes none (LLaVA);
  * what the task needs: a demonstration (`response`/`completion`/final assistant turn) for sft, `chosen` and
    `rejected` for reward, the response column for score, the columns the chosen rewards read, in the sample a
    reward receives (`vlm_rl.data.formats.reward_columns_of`: `answer` for exact_match, or its `answer_column`);
    a reward server is asked (`/health`) whether it is up and which columns it reads;
  * with a processor: prompts longer than `max_prompt_length` tokens (image tokens included), tokenised in
    batches exactly as PPO encodes them (notes instead of problems when long prompts are to be skipped).

It also shows the first rows as loaded (`DataReport.shown`: the normal form's messages, each image as its size and
a digest of its pixels, each video as its frames, frame size and rate (and, with a model, the vision tokens it
becomes), the reference response, the other columns), so that the same content in two formats reads the same. PPO, SFT, train-reward, generate and compare run the same check at start (`vlm_rl.data.bad_rows`): every
problem listed, or with `--skip_bad_rows` the bad rows skipped and named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_rl.data.bad_rows import BadRows
from vlm_rl.data.formats import (
    DataError, ImageResize, InputRow, normalise_row, open_image, read_rows, response_field, response_text, reward_columns_of,
)
from vlm_rl.data.readers import data_source
from vlm_rl.data.images import image_digest
from vlm_rl.data.prompts import no_video_problem, prompt_lengths, takes_video
from vlm_rl.data.videos import open_video

TASKS = ("ppo", "sft", "reward", "score")
MAX_LISTED = 50


@dataclass(frozen=True)
class Problem:
    """One problem: where ("file:line", or the file for a whole-file problem), the field (if one) and the message."""

    source: str
    field: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}: field '{self.field}': {self.message}" if self.field else f"{self.source}: {self.message}"


@dataclass
class DataReport:
    """What `check_data` found: every problem, the rows read, and notes that are not errors."""

    path: str
    task: str
    split: str = "train"
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # the first rows as loaded (`describe_sample`)
    multi_turn: int = 0  # rows whose prompt holds an earlier assistant turn

    @property
    def bad_sources(self) -> set[str]:
        """The rows ("file:line") with at least one problem."""
        return {p.source for p in self.problems if p.line is not None}

    @property
    def bad_rows(self) -> int:
        """Rows with at least one problem."""
        return len(self.bad_sources)

    @property
    def usable(self) -> bool:
        """No whole-file problem and at least one row without problems."""
        return not any(p.line is None for p in self.problems) and self.bad_rows < self.rows

    def summary(self) -> str:
        """One line: rows read and problems found."""
        if not self.problems:
            return f"{self.path}: {self.rows} row(s) checked for {self.task}: no problems"
        return (
            f"{self.path}: {len(self.problems)} problem(s) in {self.bad_rows} of {self.rows} row(s) checked for "
            f"{self.task}" + ("" if self.usable else " (nothing usable)")
        )

    def message(self, limit: int = MAX_LISTED) -> str:
        """The summary, the first `limit` problems (one per line), a count of the rest, and what to do."""
        lines = [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        advice = f"Fix them and run again (`vlm-rl validate-data {self.path} --task {self.task}` lists them all)."
        return "\n".join([self.summary() + ":", *lines, advice])

    def raise_if_problems(self) -> None:
        """DataError listing the problems (the first MAX_LISTED), if there are any."""
        if self.problems:
            raise DataError(self.message())

    def rows_to_skip(self, skip_bad_rows: bool, max_bad_row_fraction: float) -> BadRows:
        """The bad rows to leave out. Without `skip_bad_rows` any problem is a DataError listing them all (a run
        stops before any model loads); with it, so is a problem of the file as a whole, a file without a good row,
        or more than `max_bad_row_fraction` bad rows."""
        file = str(data_source(self.path, self.split)) if self.usable else self.path
        if not self.problems:
            return BadRows(file, self.rows)
        if not skip_bad_rows or not self.usable:
            self.raise_if_problems()
        if self.bad_rows > max_bad_row_fraction * self.rows:
            raise DataError(
                f"--skip_bad_rows: {self.bad_rows} of {self.rows} rows are bad, more than max_bad_row_fraction="
                f"{max_bad_row_fraction:g} allows; fix the data or raise max_bad_row_fraction.\n" + self.message()
            )
        by_row: dict[str, dict] = {}
        for p in self.problems:
            record = by_row.setdefault(p.source, {"file": file, "line": p.line, "source": p.source, "reasons": []})
            record["reasons"].append(f"field '{p.field}': {p.message}" if p.field else p.message)
        records = [{**{k: v for k, v in r.items() if k != "reasons"}, "reason": " ".join(r["reasons"])} for r in by_row.values()]
        return BadRows(file, self.rows, records)


def check_data(
    path: str | os.PathLike,
    task: str,
    *,
    processor: Any = None,
    max_prompt_length: int | None = None,
    required_columns: Sequence[str] | Mapping[str, str] = (),
    skip_long_prompts: bool = False,
    split: str = "train",
    response_column: str = "response",
    check_images: bool = True,
    batch_size: int = 32,
    column_map: str | Mapping[str, str] | None = None,
    resize: ImageResize | None = None,
    show: int = 0,
) -> DataReport:
    """Read every row of `path` and report every problem for `task` (see the module docstring).

    `required_columns`: columns every sample must give a reward, or {column: who needs it} for the message.
    `skip_long_prompts`: prompts over `max_prompt_length` become notes, not problems. `check_images=False`
    leaves images unopened (and prompt lengths unchecked). `column_map` and `resize` as for `load_samples`;
    `show`: how many of the first good rows to describe in `DataReport.shown`.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    needed = dict(required_columns) if isinstance(required_columns, Mapping) else {c: "" for c in required_columns}
    processor = processor if check_images else None  # prompt lengths need the images
    report = DataReport(str(path), task, split)
    try:
        rows, base_dir = read_rows(path, split, column_map)
        pending: list[dict] = []
        for sample in _checked_rows(rows, base_dir, task, needed, response_column, check_images, resize, report, processor):
            if len(report.shown) < show:
                report.shown.append(f"{sample['_source']} as loaded: {describe_sample(sample, check_images, processor)}")
            pending.append(sample)
            if len(pending) == batch_size:
                _check_lengths(processor, max_prompt_length, skip_long_prompts, pending, report)
                pending = []
        _check_lengths(processor, max_prompt_length, skip_long_prompts, pending, report)
    except DataError as e:  # the file as a whole cannot be read (or --column_map names a column no row has)
        report.problems.insert(0, Problem(e.source or str(path), e.field, e.detail))
        return report
    if report.rows == 0:
        report.problems.append(Problem(str(path), None, "empty: no rows. Give a file with one JSON object per line (or a JSON list)."))
    if task == "sft" and report.multi_turn:
        report.notes.append(f"{report.multi_turn} row(s) hold several assistant turns: SFT trains on every assistant turn "
                            "(TRL's assistant_only_loss), the earlier ones included")
    report.problems.sort(key=lambda p: -1 if p.line is None else p.line)  # length problems come a batch late
    return report


def _checked_rows(
    rows: Iterator[InputRow],
    base_dir: Path,
    task: str,
    needed: dict[str, str],
    response_column: str,
    check_images: bool,
    resize: ImageResize | None,
    report: DataReport,
    processor: Any = None,
) -> Iterator[dict]:
    """Each row's problems go into `report`; the rows without any come out as samples with opened images and videos."""
    for row in rows:
        report.rows += 1
        found = _row_problems(row, base_dir, task, needed, response_column, check_images, resize, processor)
        if isinstance(found, dict):
            report.multi_turn += any(m["role"] == "assistant" for m in found["prompt"])
            yield found
        else:
            report.problems += found


def _row_problems(
    row: InputRow, base_dir: Path, task: str, needed: dict[str, str], response_column: str, check_images: bool,
    resize: ImageResize | None,
    processor: Any = None,
) -> dict | list[Problem]:
    """The row's sample (images and videos opened) when it has no problem, else every problem found in it."""

    def problem(e: DataError) -> Problem:
        return Problem(e.source or row.source, e.field, e.detail, row.line)

    if row.error is not None:
        return [problem(row.error)]
    try:
        sample = normalise_row(row.fields, row.source)
    except DataError as e:
        return [problem(e)]
    given = reward_columns_of(sample) - ({"completion"} if task == "score" else set())  # score scores the completion
    problems = [
        Problem(row.source, column, f"missing{f' ({who})' if who else ''}. Add the column to every row, or map one onto it "
                f"with --column_map SOURCE={column}.", row.line)
        for column, who in needed.items() if column not in given
    ]
    for name, value, if_missing in _task_fields(task, row.fields, sample, response_column):
        try:
            text = response_text(value, row.source, name, if_missing)
        except DataError as e:
            problems.append(problem(e))
            continue
        if task == "sft" and not text:
            problems.append(Problem(row.source, name, "empty demonstration: SFT needs a non-empty answer to learn.", row.line))
    if task == "sft" and sample["prompt"][-1]["role"] not in ("user", "tool"):
        problems.append(Problem(row.source, "prompt", f"ends with a {sample['prompt'][-1]['role']!r} turn; SFT needs the prompt to end with a user (or tool) turn.", row.line))
    if sample["videos"] and processor is not None and not takes_video(processor):
        problems.append(Problem(row.source, sample["videos"][0].field_name, no_video_problem(processor) + ".", row.line))
    images, videos = [], []
    if check_images:
        for ref in sample["images"]:
            try:
                images.append(open_image(ref, base_dir, row.source, resize))
            except DataError as e:
                problems.append(problem(e))
        for ref in sample["videos"]:
            try:
                videos.append(open_video(ref, base_dir, row.source, resize.video if resize is not None else None))
            except DataError as e:
                problems.append(problem(e))
    if problems:
        return problems
    return {**sample, "images": images if check_images else sample["images"], "videos": videos if check_images else sample["videos"], "_line": row.line}


def video_tokens(video: Any, processor: Any) -> int:
    """The vision tokens `processor` makes of a `Video` (its frames already sampled and sized)."""
    frames = processor.video_processor
    t, _, h, w = video.frames.shape
    return frames.get_num_of_video_patches(t, h, w) // frames.merge_size**2


def describe_sample(sample: dict, images_opened: bool = True, processor: Any = None) -> str:
    """One JSON line: the sample's messages, its images (size and pixel digest, or the reference when not opened),
    its videos (frames, frame size, rate, source; with a processor that takes video, the vision tokens each becomes),
    its reference response and its other columns."""
    images = [image_digest(im) if images_opened else repr(im.source)[:80] for im in sample["images"]]
    videos = [
        (v.describe() + (f": {video_tokens(v, processor)} vision tokens" if processor is not None and takes_video(processor) else ""))
        if images_opened else repr(v.source)[:80]
        for v in sample.get("videos") or ()
    ]
    columns = {k: v for k, v in sample.items() if k not in ("prompt", "images", "videos", "completion", "_source", "_line")}
    described = {"prompt": sample["prompt"], "images": images, **({"videos": videos} if videos else {}),
                 "completion": sample["completion"], "columns": columns}
    return json.dumps(described, ensure_ascii=False, default=lambda v: f"<{type(v).__name__}>")


def _task_fields(task: str, raw: dict, sample: dict, response_column: str) -> list[tuple[str, Any, str]]:
    """(field, value, what to do when it is missing) for the response-like fields `task` needs."""
    if task == "sft":
        return [("response", sample["completion"], "missing demonstration: SFT needs a 'response' (or 'completion', or a final assistant turn).")]
    if task == "reward":
        pair = "A preference pair needs 'chosen' and 'rejected' responses."
        return [("chosen", raw.get("chosen"), f"missing. {pair}"), ("rejected", raw.get("rejected"), f"missing. {pair}")]
    if task == "score":
        name, value, if_missing = response_field(raw, sample, response_column)
        return [(name, value, if_missing)]
    return []


def _check_lengths(processor: Any, max_prompt_length: int | None, skip: bool, samples: list[dict], report: DataReport) -> None:
    """Prompts (image tokens included) over `max_prompt_length`: problems, or notes when they are to be skipped."""
    if processor is None or max_prompt_length is None or not samples:
        return
    for sample, n in zip(samples, prompt_lengths(processor, samples, batch_size=len(samples))):
        if n <= max_prompt_length:
            continue
        if skip:
            report.notes.append(f"{sample['_source']}: prompt of {n} tokens > max_prompt_length={max_prompt_length}: skipped (skip_long_prompts)")
        else:
            report.problems.append(Problem(
                sample["_source"], "prompt",
                f"{n} tokens (image tokens included) > max_prompt_length={max_prompt_length}. Shorten it, lower the "
                "processor's max_pixels, raise max_prompt_length, or set skip_long_prompts to drop such rows.",
                sample["_line"],
            ))


# ----------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-rl validate-data",
        description="Check every row of a dataset for a task and list every problem by file, line and field "
        "(exit status 2 when there are any, 0 when clean); show the first row as loaded.",
    )
    parser.add_argument("data", help=".jsonl, .json, .csv, .parquet, .arrow or a dataset directory (any supported format)")
    parser.add_argument("--task", choices=TASKS, default="ppo", help="what the data is for (default: ppo)")
    parser.add_argument("--split", default="train", help="split to read from a dataset directory")
    parser.add_argument("--column_map", "--column-map", default=None, help="rename columns first: SOURCE=TARGET,... (e.g. question=prompt,img=image)")
    parser.add_argument("--model", default=None, help="model directory whose processor measures prompt lengths and sizes the images ('tiny' works)")
    parser.add_argument(
        "--max_prompt_length", "--max-prompt-length", type=int, default=None,
        help="longest prompt in tokens, image tokens included (with --model; default: PPO's max_prompt_length)",
    )
    parser.add_argument("--min_pixels", "--min-pixels", type=int, default=None, help="override the processor's min_pixels")
    parser.add_argument("--max_pixels", "--max-pixels", type=int, default=None, help="override the processor's max_pixels")
    parser.add_argument(
        "--reward", action="append", default=[],
        help="reward spec (repeatable): the columns it reads are required (exact_match: its answer_column, 'answer'); "
        "a reward server must answer",
    )
    parser.add_argument("--response_column", "--response-column", default="response", help="--task score: the column scored")
    parser.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true",
                        help="exit 0 when a run with --skip_bad_rows would go ahead (bad rows at most --max_bad_row_fraction)")
    parser.add_argument("--max_bad_row_fraction", "--max-bad-row-fraction", type=float, default=0.1,
                        help="with --skip_bad_rows: the largest fraction of bad rows a run accepts (default 0.1)")
    parser.add_argument("--show", type=int, default=1, help="print the first N good rows as loaded (default 1; 0: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`vlm-rl validate-data`: every problem on stdout, then the summary; exit status 2 when there are problems
    (with --skip_bad_rows: when a run would stop on them)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    processor, resize, max_prompt_length = None, None, args.max_prompt_length
    if args.model is not None:
        from vlm_rl.training.config import PPOConfig
        from vlm_rl.models.loading import image_resize, load_processor, require_model

        model = require_model(args.model)
        processor = load_processor(model, args.min_pixels, args.max_pixels)
        resize = image_resize(model, processor)
        if max_prompt_length is None:
            max_prompt_length = PPOConfig.__dataclass_fields__["max_prompt_length"].default
    elif max_prompt_length is not None:
        parser.error("--max_prompt_length needs --model (its processor counts the tokens)")
    from reward_models.registry import reward_columns

    report = check_data(
        args.data, args.task, processor=processor, max_prompt_length=max_prompt_length,
        required_columns=reward_columns(args.reward), split=args.split, response_column=args.response_column,
        column_map=args.column_map, resize=resize, show=args.show,
    )
    for line in report.shown:
        print(line)
    for p in report.problems:
        print(p)
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    if report.problems and args.skip_bad_rows:
        skipped = report.rows_to_skip(True, args.max_bad_row_fraction)  # a DataError when a run would stop
        print(f"--skip_bad_rows: a run would skip these {len(skipped.records)} row(s) and go ahead")
    elif report.problems:
        sys.exit(2)
    return 0


if __name__ == "__main__":
    from vlm_rl.errors import run_command

    run_command("validate-data", main, sys.argv[1:])
