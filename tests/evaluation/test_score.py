"""`vlm-rl score`: every row out with its scores, errors reported by line, summary, crash-safe --resume."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import user_error
from vlm_rl.data.validate import check_data as validate
from vlm_rl.evaluation.score import main, summarize

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # score_helpers.py


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def as_seen_from(row: dict, data_dir: Path, out: Path) -> dict:
    """`row` with its relative image path re-based from `data_dir` to `out`'s folder, as `score` writes it."""
    return {**row, "image": os.path.relpath(data_dir / row["image"], out.parent)} if "image" in row else row


@pytest.fixture()
def data_copy(synthetic_data_dir, tmp_path) -> Path:
    """A private copy of the synthetic set (tests edit rows and images)."""
    return Path(shutil.copytree(synthetic_data_dir, tmp_path / "data"))


def test_exact_match_scores_every_row(synthetic_data_dir, tmp_path):
    out = tmp_path / "scored.jsonl"
    result = main(["--data", str(synthetic_data_dir / "test.jsonl"), "--reward", "exact_match", "--out", str(out), "--batch-size", "3", "--no-progress"])
    rows_in = read_jsonl(synthetic_data_dir / "test.jsonl")
    rows_out = read_jsonl(out)
    assert len(rows_out) == len(rows_in) == result["rows"]
    for original, scored in zip(rows_in, rows_out):
        assert {k: v for k, v in scored.items() if not k.startswith("score")} == as_seen_from(original, synthetic_data_dir, out)
        assert scored["score_exact_match"] == 1.0 and scored["score"] == 1.0  # response == answer in test.jsonl
    assert result["errors"] == 0 and read_jsonl(tmp_path / "scored.errors.jsonl") == []
    assert not Path(str(out) + ".partial").exists()


def test_multiple_rewards_one_column_each(synthetic_data_dir, tmp_path):
    out = tmp_path / "scored.jsonl"
    main(["--data", str(synthetic_data_dir / "test.jsonl"), "--reward", "exact_match", "--reward", "length:0.5",
          "--reward", "exact_match:2", "--out", str(out), "--no-progress"])
    for row in read_jsonl(out):
        assert {"score_exact_match", "score_length", "score_exact_match_2", "score"} <= set(row)
        assert row["score"] == pytest.approx(row["score_exact_match"] + 0.5 * row["score_length"] + 2 * row["score_exact_match_2"])


def test_summary_numbers(synthetic_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    rows = read_jsonl(synthetic_data_dir / "test.jsonl")[:5]
    for row, response in zip(rows, ["a", "bb", "cccc", "dddddddd", "e" * 16]):
        row["response"] = response
    data = tmp_path / "lengths.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(synthetic_data_dir / "images", tmp_path / "images")
    result = main(["--data", str(data), "--reward", "score_helpers:response_length", "--out", str(tmp_path / "o.jsonl"), "--no-progress"])
    values = np.array([1, 2, 4, 8, 16], dtype=float)
    stats = result["summary"]["score_response_length"]
    expected = {
        "count": 5, "mean": values.mean(), "std": values.std(), "min": 1.0, "p25": np.percentile(values, 25),
        "median": np.median(values), "p75": np.percentile(values, 75), "max": 16.0,
    }
    assert stats == pytest.approx(expected)
    assert result["summary"]["score"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "score_response_length" in printed and f"{values.mean():.4f}" in printed and f"{values.std():.4f}" in printed
    assert summarize([None, None]) == {"count": 0, "mean": None, "std": None, "min": None, "p25": None, "median": None, "p75": None, "max": None}


def test_bad_rows_are_reported_and_the_rest_scored(data_copy, tmp_path, capsys):
    rows = read_jsonl(data_copy / "test.jsonl")
    (data_copy / "images" / "broken.png").write_bytes(b"this is not a png")
    rows[1]["image"] = "images/broken.png"  # line 2: unreadable image
    rows[3]["image"] = "images/missing.png"  # line 4: missing image
    del rows[4]["response"]  # line 5: no response
    lines = [json.dumps(r) for r in rows]
    lines[6] = '{"image": "images/x.png", "prompt": '  # line 7: malformed JSON
    data = data_copy / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out, errors = tmp_path / "scored.jsonl", tmp_path / "errs.jsonl"
    result = main(["--data", str(data), "--reward", "exact_match", "--out", str(out), "--errors", str(errors), "--batch-size", "4", "--no-progress"])
    stderr = capsys.readouterr().err
    bad_lines = [2, 4, 5, 7]
    error_rows = read_jsonl(errors)
    assert [e["line"] for e in error_rows] == bad_lines and result["errors"] == 4
    for e in error_rows:
        assert e["source"] == f"{data}:{e['line']}" and e["error"]
        assert f"line {e['line']}:" in stderr
    assert "cannot be read" in error_rows[0]["error"] and "does not exist" in error_rows[1]["error"]
    assert "missing response" in error_rows[2]["error"] and "malformed JSON" in error_rows[3]["error"]
    scored = read_jsonl(out)
    assert len(scored) == len(rows)  # every input row keeps its place
    for lineno, row in enumerate(scored, start=1):
        if lineno in bad_lines:
            assert row["score"] is None and row["score_exact_match"] is None
        else:
            assert row["score"] == 1.0 and row["image"] == as_seen_from(rows[lineno - 1], data_copy, out)["image"]
    assert scored[6] == {"score_exact_match": None, "score": None}  # the malformed line: nothing to copy


def test_a_reward_failing_on_one_row_does_not_stop_the_others(data_copy, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    rows = read_jsonl(data_copy / "test.jsonl")
    rows[2]["response"] = "FAIL"
    data = data_copy / "fail.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    result = main(["--data", str(data), "--reward", "score_helpers:fails_on_marker", "--out", str(out), "--batch-size", "4", "--no-progress"])
    errors = read_jsonl(tmp_path / "o.errors.jsonl")
    assert [e["line"] for e in errors] == [3] and result["errors"] == 1 and "cannot score 'FAIL'" in errors[0]["error"]
    assert [r["score"] for r in read_jsonl(out)] == [None if i == 2 else 0.5 for i in range(len(rows))]


def test_a_reward_failing_everywhere_is_a_configuration_error(synthetic_data_dir, tmp_path):
    rows = read_jsonl(synthetic_data_dir / "test.jsonl")
    data = tmp_path / "no_answer.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in rows))
    shutil.copytree(synthetic_data_dir / "images", tmp_path / "images")
    with pytest.raises(ValueError, match="answer"):  # exact_match without an answer column: fail fast, not 8 error rows
        main(["--data", str(data), "--reward", "exact_match", "--out", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert not (tmp_path / "o.jsonl.partial").exists()  # nothing scored: nothing left to resume


def test_llava_conversations_give_the_response(tmp_path, synthetic_data_dir):
    rows = read_jsonl(synthetic_data_dir / "test.jsonl")[:3]
    llava = [
        {"image": str(synthetic_data_dir / r["image"]), "answer": r["answer"],
         "conversations": [{"from": "human", "value": "<image>\n" + r["prompt"]}, {"from": "gpt", "value": r["response"]}]}
        for r in rows
    ]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(llava))
    main(["--data", str(data), "--reward", "exact_match", "--out", str(tmp_path / "o.jsonl"), "--no-progress"])
    scored = read_jsonl(tmp_path / "o.jsonl")
    assert [r["score"] for r in scored] == [1.0] * 3 and scored[0]["conversations"] == llava[0]["conversations"]


def test_response_column(synthetic_data_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    main(["--data", str(synthetic_data_dir / "test.jsonl"), "--reward", "exact_match", "--response-column", "wrong_answer",
          "--out", str(out), "--no-progress"])
    assert {r["score"] for r in read_jsonl(out)} == {0.0}


def _run_cli(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "vlm_rl.evaluation.score", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_resume_after_kill_scores_every_row_exactly_once(synthetic_data_dir, tmp_path):
    data = synthetic_data_dir / "train.jsonl"
    rows = read_jsonl(data)
    out, log = tmp_path / "scored.jsonl", tmp_path / "calls.log"
    partial = Path(str(out) + ".partial")
    args = ["--data", str(data), "--reward", "score_helpers:counting", "--out", str(out), "--batch-size", "4", "--no-progress"]

    killed = _run_cli(args, {"SCORE_TEST_CALL_LOG": str(log), "SCORE_TEST_KILL_AT_CALL": "3"})
    assert killed.returncode == -9, killed.stderr  # SIGKILL during the third batch
    assert not out.exists() and len(read_jsonl(partial)) == 8  # two batches made it to disk
    with open(partial, "a") as f:
        f.write('{"image": "images/0000')  # and a torn line, as if killed mid-write

    refused = _run_cli(args, {"SCORE_TEST_CALL_LOG": str(log)})
    assert refused.returncode != 0 and "--resume" in refused.stderr  # an existing partial is never silently clobbered

    resumed = _run_cli([*args, "--resume"], {"SCORE_TEST_CALL_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 8 of 32 rows" in resumed.stderr
    scored = read_jsonl(out)
    assert len(scored) == len(rows) and not partial.exists()
    expected = [as_seen_from(r, synthetic_data_dir, out) for r in rows]
    assert [{k: v for k, v in r.items() if not k.startswith("score")} for r in scored] == expected  # each row once, in order
    assert all(r["score"] == 1.0 for r in scored)

    calls = log.read_text().splitlines()
    sources = [f"{data}:{i}" for i in range(1, len(rows) + 1)]
    counts = {s: calls.count(s) for s in sources}
    assert all(counts[s] == 1 for s in sources[:8])  # the rows already written were not scored again
    assert all(counts[s] == 2 for s in sources[8:12])  # the batch killed mid-way is scored again (it never reached disk)
    assert all(counts[s] == 1 for s in sources[12:])


def test_resume_refuses_a_partial_of_another_input(synthetic_data_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    partial = Path(str(out) + ".partial")
    partial.write_text(json.dumps({"image": "elsewhere.png", "score": 1.0}) + "\n")
    with pytest.raises(ValueError, match="not a partial run of this input"):
        main(["--data", str(synthetic_data_dir / "test.jsonl"), "--reward", "exact_match", "--out", str(out), "--resume", "--no-progress"])


def test_an_output_in_another_folder_scores_again_and_a_rescore_replaces_its_columns(data_copy, tmp_path, capsys):
    first, second = tmp_path / "elsewhere" / "scored.jsonl", tmp_path / "again" / "deeper" / "rescored.jsonl"
    main(["--data", str(data_copy / "test.jsonl"), "--reward", "exact_match", "--reward", "length", "--out", str(first), "--no-progress"])
    assert {"score_exact_match", "score_length", "score"} <= set(read_jsonl(first)[0])
    capsys.readouterr()
    result = main(["--data", str(first), "--reward", "exact_match", "--out", str(second), "--no-progress"])
    assert result["errors"] == 0  # every image path still valid, from another folder again
    assert "has score columns (score, score_exact_match, score_length): replaced" in capsys.readouterr().err  # named, not silently
    for row, original in zip(read_jsonl(second), read_jsonl(data_copy / "test.jsonl"), strict=True):
        assert set(row) == set(original) | {"score_exact_match", "score"}  # score_length (the first run's) is gone
        assert (second.parent / row["image"]).resolve() == (data_copy / original["image"]).resolve()
        assert row["score"] == 1.0
    report = validate(str(second), "score")
    assert report.usable and not report.problems


def test_no_row_scored_is_an_error_after_writing_every_row(synthetic_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "o.jsonl"
    err = user_error(capsys, ["score", "--data", str(synthetic_data_dir / "test.jsonl"), "--reward", "score_helpers:never_scores",
                              "--out", str(out), "--no-progress"])
    assert err.startswith("vlm-rl score: error: no row of") and "could be scored" in err
    assert [r["score"] for r in read_jsonl(out)] == [None] * len(read_jsonl(synthetic_data_dir / "test.jsonl"))


def test_ctrl_c_keeps_the_scored_rows_and_prints_the_command_that_resumes(synthetic_data_dir, tmp_path):
    data, out, log = synthetic_data_dir / "train.jsonl", tmp_path / "scored.jsonl", tmp_path / "calls.log"
    args = ["--data", str(data), "--reward", "score_helpers:counting", "--out", str(out), "--batch-size", "4", "--no-progress"]
    stopped = _run_cli(args, {"SCORE_TEST_CALL_LOG": str(log), "SCORE_TEST_SIGINT_AT_CALL": "3"})
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    [line] = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert line.startswith("vlm-rl score: interrupted: 8 of 32 rows scored, kept in") and len(read_jsonl(Path(str(out) + ".partial"))) == 8
    command = shlex.split(line.split("to score the rest: ", 1)[1])
    assert command[:2] == ["vlm-rl", "score"] and command[-1] == "--resume"
    resumed = _run_cli(command[2:], {"SCORE_TEST_CALL_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr
    assert [r["score"] for r in read_jsonl(out)] == [1.0] * 32
