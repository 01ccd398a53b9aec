"""`vlm-rl score`: score existing responses offline with one or more rewards.

    vlm-rl score --data answers.jsonl --reward exact_match --reward runs/rm:0.5 --out scored.jsonl

Input: any dataset format of `vlm_rl.data.formats` (TRL conversational, LLaVA, plain JSONL; .jsonl, .json, dataset
directory). Each row is normalised with `vlm_rl.data.normalise_row`, the same function `load_samples` uses,
but row by row, so that one bad row is reported and the others are still scored (`load_samples` stops at the
first bad row). The response scored is the normal form's `completion` (`response`/`completion` column, or the
final assistant/gpt turn of a conversation); `--response-column NAME` scores another column instead (e.g.
`chosen`).

Before any reward loads, `vlm_rl.data.validate.check_data` reads the whole input: a file that cannot be scored at
all (missing, empty, unreadable, no usable row, e.g. every row without the `answer` that exact_match reads) is
an error listing every problem by line and field.

Output: one line per input row, in input order: the original row's fields, plus `score_<name>` per reward and
`score` (the weighted sum, see `reward_models.base.CombinedReward`). Image paths are rewritten to stay valid from
OUT's folder (as `vlm-rl generate` writes them), so OUT scores and validates again wherever it is. Columns named
`score` or `score_*` in the input (an earlier `vlm-rl score`'s) are replaced by this run's, not kept beside them
(stderr names them). When no row could be scored at all, the files are written and the command stops with an
error. A row that cannot be scored (malformed
JSON, bad row, missing or unreadable image, missing response, a reward raising on it) keeps its place with
null scores, is reported on stderr by line number, and goes to the errors file
(`{"line": N, "source": "file:N", "error": "..."}`; default OUT with `.errors.jsonl` for `.jsonl`). A malformed
JSON line appears in OUT as an object holding only the null score columns. Line numbers are 1-based lines of
a .jsonl file, and 0-based row indices of a .json list or a dataset directory.

Crash safety: rows are appended to `OUT.partial` (and errors to `ERRORS.partial`), flushed and fsynced after
every batch; both are renamed into place at the end. `--resume` keeps the complete rows of an existing
`OUT.partial` (a torn last line is dropped), checks they are the first rows of this input, and scores only the
rest, so no row is scored twice. Ctrl-C leaves `OUT.partial` and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from vlm_rl.atomic import OutputExistsError
from vlm_rl.data.formats import (
    DataError, InputRow, normalise_row, open_image, open_video, read_rows, response_field, response_text, reward_kwargs,
)
from vlm_rl.errors import UserError

SCORE_PREFIX = "score_"
COMBINED = "score"


def prepare(row: InputRow, base_dir: Path, response_column: str) -> dict:
    """The normal-form sample of a row with its images and videos opened (as stored; videos sampled as qwen-vl-utils
    does by default) and `completion` set; DataError if impossible."""
    if row.error is not None:
        raise row.error
    sample = normalise_row(row.fields, row.source)
    sample["images"] = [open_image(ref, base_dir, row.source) for ref in sample["images"]]
    sample["videos"] = [open_video(ref, base_dir, row.source) for ref in sample["videos"]]
    field, value, if_missing = response_field(row.fields, sample, response_column)
    sample["completion"] = response_text(value, row.source, field, if_missing)
    return sample


# ----------------------------------------------------------------------------------------- writing


def _json_default(obj: Any) -> Any:
    """Non-JSON values a dataset directory may hold (PIL images, bytes, numpy) in a readable form."""
    try:
        from PIL import Image

        if isinstance(obj, Image.Image):
            return f"<PIL image {obj.width}x{obj.height} {obj.mode}>"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def is_score_column(name: str) -> bool:
    """`score` and `score_*`: the columns `vlm-rl score` writes (an input's are an earlier run's, replaced)."""
    return name == COMBINED or name.startswith(SCORE_PREFIX)


def _fields_of(raw: dict | None) -> dict:
    """The row's fields as they will appear in the output, its earlier score columns left out (JSON round trip, so
    that resume can compare them)."""
    return {} if raw is None else {k: v for k, v in json.loads(_dumps(raw)).items() if not is_score_column(k)}


class ScoreInterrupted(KeyboardInterrupt):
    """Ctrl-C during `vlm-rl score`; the message says what was kept (`resumable`: rows are, in OUT.partial)."""

    def __init__(self, message: str, resumable: bool):
        super().__init__(message)
        self.resumable = resumable


def _complete_lines(path: Path) -> tuple[list[dict], int]:
    """The complete JSON lines of a partial file and their byte length (a torn last line is left out)."""
    rows, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
    return rows, good


class _AppendLog:
    """An append-only JSONL file made durable batch by batch (flush + fsync)."""

    def __init__(self, path: Path, truncate_to: int | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "r+b" if truncate_to is not None and path.exists() else "wb")
        if truncate_to is not None:
            self.f.truncate(truncate_to)
            self.f.seek(truncate_to)

    def write(self, rows: list[dict]) -> None:
        if rows:
            self.f.write("".join(_dumps(r) + "\n" for r in rows).encode("utf-8"))

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------------------- summary


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float | None]) -> dict:
    """count, mean, std (population), min, p25, median, p75, max of the non-null values (None when empty)."""
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return {"count": 0, **{k: None for k in ("mean", "std", "min", "p25", "median", "p75", "max")}}
    mean = math.fsum(xs) / len(xs)
    return {
        "count": len(xs),
        "mean": mean,
        "std": math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs)),
        "min": xs[0],
        "p25": _percentile(xs, 0.25),
        "median": _percentile(xs, 0.5),
        "p75": _percentile(xs, 0.75),
        "max": xs[-1],
    }


def format_summary(summary: dict[str, dict], rows: int, errors: int) -> str:
    keys = ("count", "mean", "std", "min", "p25", "median", "p75", "max")
    width = max(len("reward"), *(len(k) for k in summary))
    lines = [f"{rows} rows, {rows - errors} scored, {errors} with errors", f"{'reward':<{width}}  " + "  ".join(f"{k:>9}" for k in keys)]
    for name, stats in summary.items():
        cells = [f"{stats['count']:>9d}"] + [f"{'-':>9}" if stats[k] is None else f"{stats[k]:>9.4f}" for k in keys[1:]]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- scoring


def _default_errors_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(".jsonl")] + ".errors.jsonl") if out.name.endswith(".jsonl") else out.with_name(out.name + ".errors.jsonl")


def _score_batch(reward, samples: list[dict]) -> tuple[dict[str, list], list]:
    prompts = [s["prompt"] for s in samples]
    completions = [s["completion"] for s in samples]
    # the completion column is what is being scored, not a column beside it
    return reward.score(prompts, completions, **reward_kwargs(samples, exclude=("completion",)))


def score_file(
    data: str | os.PathLike,
    rewards: list[str],
    out: str | os.PathLike,
    batch_size: int = 16,
    resume: bool = False,
    overwrite: bool = False,
    response_column: str = "response",
    errors: str | os.PathLike | None = None,
    split: str = "train",
    progress: bool = True,
    column_map: str | None = None,
) -> dict:
    """Score every row of `data` with `rewards` into `out` (see the module docstring); returns the summary."""
    from tqdm.auto import tqdm

    from reward_models.registry import load_rewards, reward_columns
    from vlm_rl.data.validate import check_data

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data, out = Path(data), Path(out)
    errors_path = Path(errors) if errors is not None else _default_errors_path(out)
    partial, errors_partial = Path(str(out) + ".partial"), Path(str(errors_path) + ".partial")
    if partial.exists() and not (resume or overwrite):
        raise OutputExistsError(
            f"{partial} exists (an interrupted run): pass --resume to continue it, or --overwrite to start again"
        )
    # Before any reward (model) loads: a file that cannot be scored at all stops here with every problem listed;
    # bad rows in a usable file keep their place with null scores (below).
    report = check_data(
        data, "score", required_columns=reward_columns(rewards), split=split, response_column=response_column, check_images=False,
        column_map=column_map,
    )
    if not report.usable:
        report.raise_if_problems()

    from vlm_rl.evaluation.generate import portable_images

    reward = load_rewards(rewards)
    columns = [SCORE_PREFIX + n for n in reward.names]
    rows_in, base_dir = read_rows(data, split, column_map)
    all_rows = list(rows_in)
    position = {id(row): i for i, row in enumerate(all_rows)}

    def output_fields(row: InputRow) -> dict:
        """The row's fields as OUT holds them: image paths valid from OUT's folder, earlier score columns out."""
        return _fields_of(None if row.raw is None else portable_images(row.raw, base_dir, out, position[id(row)]))

    earlier = sorted({k for row in all_rows if isinstance(row.raw, dict) for k in row.raw if is_score_column(k)})
    if earlier:
        print(f"{data} has score columns ({', '.join(earlier)}): replaced by this run's", file=sys.stderr)

    done_rows: list[dict] = []
    keep_bytes = None
    kept_errors: list[dict] = []
    if resume and partial.exists():
        done_rows, keep_bytes = _complete_lines(partial)
        if len(done_rows) > len(all_rows):
            raise DataError(f"{partial} holds {len(done_rows)} rows but {data} has only {len(all_rows)}: not a partial run of this input. Use --overwrite to start again.")
        for row, done in zip(all_rows, done_rows):
            if {k: v for k, v in done.items() if not is_score_column(k)} != output_fields(row):
                raise DataError(
                    f"{partial} does not match {data} at {row.source}: it is not a partial run of this input. "
                    "Use --overwrite to start again."
                )
        done_lines = {row.line for row in all_rows[: len(done_rows)]}
        if errors_partial.exists():
            kept_errors = [e for e in _complete_lines(errors_partial)[0] if e.get("line") in done_lines]
        print(f"resuming: {len(done_rows)} of {len(all_rows)} rows already scored in {partial}", file=sys.stderr)
    elif resume:
        print(f"--resume: no {partial}; starting from the first row", file=sys.stderr)

    out_log = _AppendLog(partial, keep_bytes if resume else None)
    err_log = _AppendLog(errors_partial, None)
    err_log.write(kept_errors)
    err_log.commit()
    n_errors = len(kept_errors)
    todo = all_rows[len(done_rows) :]
    scored_any = False
    bar = tqdm(total=len(all_rows), initial=len(done_rows), desc="scoring", unit="row", disable=not progress, file=sys.stderr)
    written = 0
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            results: list[tuple[dict | None, str | None]] = []  # per row: (scores, error)
            ready: list[tuple[int, dict]] = []
            for i, row in enumerate(chunk):
                try:
                    ready.append((i, prepare(row, base_dir, response_column)))
                    results.append((None, None))
                except DataError as e:
                    results.append((None, str(e)))
            if ready:
                try:
                    cols, combined = _score_batch(reward, [s for _, s in ready])
                    for j, (i, _) in enumerate(ready):
                        results[i] = ({**{c: cols[n][j] for c, n in zip(columns, reward.names)}, COMBINED: combined[j]}, None)
                    scored_any = True
                except Exception as batch_error:  # isolate the row(s) it fails on
                    any_ok = False
                    for i, sample in ready:
                        try:
                            cols, combined = _score_batch(reward, [sample])
                            results[i] = ({**{c: cols[n][0] for c, n in zip(columns, reward.names)}, COMBINED: combined[0]}, None)
                            any_ok = True
                        except Exception as e:
                            results[i] = (None, f"{chunk[i].source}: reward failed: {type(e).__name__}: {e}")
                    if not any_ok and not scored_any:
                        raise batch_error  # nothing scores at all: a configuration error, not a bad row
                    scored_any = scored_any or any_ok
            out_rows, err_rows = [], []
            for row, (scores, error) in zip(chunk, results):
                if error is not None:
                    err_rows.append({"line": row.line, "source": row.source, "error": error})
                    bar.write(f"error: line {row.line}: {error}", file=sys.stderr)
                    scores = {**{c: None for c in columns}, COMBINED: None}
                out_rows.append({**output_fields(row), **scores})
            err_log.write(err_rows)
            err_log.commit()  # errors first: on resume, errors of rows not in OUT.partial are dropped
            out_log.write(out_rows)
            out_log.commit()
            n_errors += len(err_rows)
            written += len(out_rows)
            bar.update(len(chunk))
    except BaseException as stopped:
        nothing_kept = written == 0 and not done_rows
        if nothing_kept:  # nothing to resume from: leave no partial files behind
            out_log.close()
            err_log.close()
            partial.unlink(missing_ok=True)
            errors_partial.unlink(missing_ok=True)
        if isinstance(stopped, KeyboardInterrupt):
            kept = f"{len(done_rows) + written} of {len(all_rows)} rows scored, kept in {partial}"
            raise ScoreInterrupted(f"interrupted: {'nothing written' if nothing_kept else kept}", resumable=not nothing_kept) from None
        raise
    finally:
        bar.close()
        out_log.close()
        err_log.close()

    os.replace(errors_partial, errors_path)
    os.replace(partial, out)
    final_rows, _ = _complete_lines(out)
    summary = {name: summarize([r.get(name) for r in final_rows]) for name in [*columns, COMBINED]}
    print(format_summary(summary, len(final_rows), n_errors))
    print(f"scores written to {out}" + (f"; {n_errors} error(s) in {errors_path}" if n_errors else ""))
    if final_rows and summary[COMBINED]["count"] == 0:
        raise UserError(
            f"no row of {data} could be scored ({len(final_rows)} rows: {n_errors} with errors, listed in {errors_path}, "
            "the others without a score from any reward)"
        )
    return {"rows": len(final_rows), "errors": n_errors, "out": str(out), "errors_path": str(errors_path), "summary": summary}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-rl score",
        description="Score existing responses with one or more rewards; every input row goes to --out with its scores.",
    )
    parser.add_argument("--data", required=True, help="input: .jsonl, .json or a dataset directory (any supported format)")
    parser.add_argument("--reward", action="append", required=True, help="reward spec, e.g. exact_match, runs/rm:0.5, pkg.mod:fn (repeatable)")
    parser.add_argument("--out", required=True, help="output JSONL (written as OUT.partial, renamed at the end)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing OUT.partial and start again")
    parser.add_argument(
        "--response-column", "--response_column", dest="response_column", default="response",
        help="column holding the response; 'response' (default) = the normal form's completion (response/completion "
        "column or final assistant turn)",
    )
    parser.add_argument("--errors", default=None, help="errors file (default: OUT with .errors.jsonl)")
    parser.add_argument("--split", default="train", help="split to read from a dataset directory")
    parser.add_argument("--column_map", "--column-map", default=None, help="rename columns first: SOURCE=TARGET,... (e.g. question=prompt)")
    parser.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--torch-num-threads", "--torch_num_threads", dest="torch_num_threads", type=int, default=None,
        help="CPU intra-op threads (1 is fastest for tiny models on small machines)",
    )
    return parser


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same flags, --resume instead of --overwrite."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join(["vlm-rl", "score", *kept, "--resume"])


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.torch_num_threads:
        import torch

        torch.set_num_threads(args.torch_num_threads)
    try:
        return score_file(
            args.data,
            args.reward,
            args.out,
            batch_size=args.batch_size,
            resume=args.resume,
            overwrite=args.overwrite,
            response_column=args.response_column,
            errors=args.errors,
            split=args.split,
            progress=args.progress,
            column_map=args.column_map,
        )
    except KeyboardInterrupt as stopped:  # Ctrl-C: one line saying what was kept and how to go on, exit 130
        message = str(stopped) if isinstance(stopped, ScoreInterrupted) else "interrupted before scoring began: nothing written"
        if getattr(stopped, "resumable", False):
            message += f"; to score the rest: {resume_command(argv)}"
        print(f"vlm-rl score: {message}", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    from vlm_rl.errors import run_command

    run_command("score", main, sys.argv[1:])
