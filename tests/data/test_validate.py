"""`vlm-rl validate-data` and the same check at the start of PPO, SFT, train-reward and score: every problem of a
file, by line and field, before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import stops_early
from vlm_rl.cli import main as cli_main
from vlm_rl.data.formats import DataError
from vlm_rl.errors import UserError
from vlm_rl.data.validate import check_data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def data_dir(synthetic_data_dir, tmp_path) -> Path:
    """A copy of the synthetic set's images and test rows, to write good and bad files next to."""
    shutil.copytree(synthetic_data_dir / "images", tmp_path / "images")
    shutil.copy(synthetic_data_dir / "test.jsonl", tmp_path / "test.jsonl")
    return tmp_path


LONG_PROMPT_LINE = 8


@pytest.fixture()
def mixed(data_dir) -> tuple[Path, dict[int, str]]:
    """Good rows with six different bad ones; {line: field} of the bad ones (None: the row as a whole)."""
    rows = read_jsonl(data_dir / "test.jsonl")
    lines = [json.dumps(r) for r in rows]
    lines[1] = '{"image": "images/000001.png", "prompt": '  # 2: not JSON
    lines[2] = json.dumps({k: v for k, v in rows[2].items() if k != "prompt"})  # 3: no prompt
    lines[3] = json.dumps({**rows[3], "image": "images/missing.png"})  # 4: image does not exist
    lines[4] = json.dumps({**rows[4], "prompt": "<image> <image> " + rows[4]["prompt"]})  # 5: two placeholders, one image
    lines[5] = json.dumps({k: v for k, v in rows[5].items() if k != "answer"})  # 6: no answer for exact_match
    lines[LONG_PROMPT_LINE - 1] = json.dumps({**rows[7], "prompt": "red " * 200 + rows[7]["prompt"]})  # 8: too long
    path = data_dir / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {2: None, 3: "prompt", 4: "image", 5: "image", 6: "answer", LONG_PROMPT_LINE: "prompt"}


def test_every_bad_line_is_named_with_its_field(mixed, tiny_processor):
    path, bad = mixed
    report = check_data(path, "ppo", processor=tiny_processor, max_prompt_length=150, required_columns={"answer": "exact_match"})
    assert [(p.line, p.field) for p in report.problems] == list(bad.items())
    assert all(p.source == f"{path}:{p.line}" for p in report.problems)
    messages = {p.line: p.message for p in report.problems}
    assert "malformed JSON" in messages[2] and "does not exist" in messages[4] and "2 image placeholder(s)" in messages[5]
    assert "exact_match" in messages[6] and "max_prompt_length=150" in messages[LONG_PROMPT_LINE]
    assert report.rows == 8 and report.bad_rows == 6 and report.usable
    with pytest.raises(DataError) as info:
        report.raise_if_problems()
    assert isinstance(info.value, UserError) and all(f"{path}:{line}:" in str(info.value) for line in bad)


def test_long_prompts_are_notes_when_they_are_skipped(mixed, tiny_processor):
    path, _ = mixed
    report = check_data(path, "ppo", processor=tiny_processor, max_prompt_length=150, skip_long_prompts=True)
    assert LONG_PROMPT_LINE not in [p.line for p in report.problems]
    assert len(report.notes) == 1 and f"{path}:{LONG_PROMPT_LINE}" in report.notes[0]


def test_the_command_lists_every_problem_and_exits_2(mixed, tiny_model_dir, capsys):
    path, bad = mixed
    with pytest.raises(SystemExit) as info:
        cli_main(["validate-data", str(path), "--model", str(tiny_model_dir), "--max_prompt_length", "150", "--reward", "exact_match",
                  "--show", "0"])
    out = capsys.readouterr().out.splitlines()
    assert info.value.code == 2
    assert [line.split(":")[1] for line in out[:-1]] == [str(n) for n in bad]
    assert out[-1] == f"{path}: 6 problem(s) in 6 of 8 row(s) checked for ppo"


def test_a_clean_file_exits_0(data_dir, capsys):
    assert cli_main(["validate-data", str(data_dir / "test.jsonl"), "--reward", "exact_match"]) is None
    shown, summary = capsys.readouterr().out.strip().splitlines()
    assert summary == f"{data_dir / 'test.jsonl'}: 8 row(s) checked for ppo: no problems"
    assert shown.startswith(f"{data_dir / 'test.jsonl'}:1 as loaded: {{\"prompt\": [{{\"role\": \"user\", \"content\": [{{\"type\": \"image\"}}")


def test_non_utf8_lines_are_named_and_reading_goes_on(data_dir):
    good = (data_dir / "test.jsonl").read_bytes().splitlines()
    path = data_dir / "latin1.jsonl"
    path.write_bytes(b"\n".join([good[0], '{"prompt": "caf\u00e9"}'.encode("latin-1"), good[2], b"\xff\xfe"]) + b"\n")
    report = check_data(path, "ppo")
    assert [(p.line, p.field) for p in report.problems] == [(2, None), (4, None)]
    assert all("not UTF-8" in p.message for p in report.problems)


def test_a_non_utf8_json_list_names_its_line(data_dir):
    path = data_dir / "rows.json"
    path.write_bytes(b'[\n  {"prompt": "a"},\n  {"prompt": "caf\xe9"}\n]\n')
    (problem,) = check_data(path, "ppo").problems
    assert problem.source == f"{path}:3" and "not UTF-8" in problem.message


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_an_empty_file_is_named(data_dir, text):
    path = data_dir / "empty.jsonl"
    path.write_text(text)
    report = check_data(path, "sft")
    assert [(p.source, p.line) for p in report.problems] == [(str(path), None)] and "empty" in report.problems[0].message
    assert not report.usable


def test_sft_rows_need_a_completion(data_dir):
    rows = read_jsonl(data_dir / "test.jsonl")[:4]
    del rows[1]["response"]
    rows[2]["response"] = ["not", "messages"]
    rows[3]["response"] = ""
    path = data_dir / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = check_data(path, "sft").problems
    assert [(p.line, p.field) for p in problems] == [(2, "response"), (3, "response"), (4, "response")]
    assert "demonstration" in problems[0].message and "empty demonstration" in problems[2].message
    assert [p.line for p in check_data(path, "ppo").problems] == [3]  # PPO prompts need no completion, but not a bad one


def test_reward_pairs_need_chosen_and_rejected(synthetic_data_dir, tmp_path):
    rows = read_jsonl(synthetic_data_dir / "preferences.jsonl")[:3]
    del rows[0]["rejected"]
    for row in rows:
        row["image"] = str(synthetic_data_dir / row["image"])
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(p.line, p.field) for p in check_data(path, "reward").problems] == [(1, "rejected")]


def test_the_list_is_capped_in_the_error(data_dir):
    path = data_dir / "many.jsonl"
    path.write_text("not json\n" * 60)
    with pytest.raises(DataError) as info:
        check_data(path, "ppo").raise_if_problems()
    message = str(info.value)
    assert f"{path}:50:" in message and f"{path}:51:" not in message and "... and 10 more" in message


# ------------------------------------------------------------------------ the same check at the start of a run


@pytest.fixture()
def no_answers(data_dir) -> Path:
    """Every row lacks the `answer` that exact_match reads, and line 2 names a missing image."""
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in read_jsonl(data_dir / "test.jsonl")]
    rows[1]["image"] = "images/missing.png"
    path = data_dir / "no_answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_stops_before_the_model_loads(data_dir, tiny_model_dir, monkeypatch, capsys):
    rows = read_jsonl(data_dir / "test.jsonl")
    del rows[3]["response"]
    rows[5]["image"] = "images/missing.png"
    path = data_dir / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr("vlm_rl.sft._load_model", lambda config: pytest.fail("the model was loaded"))
    err = stops_early(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(path),
                               "--output_dir", str(data_dir / "out"), "--use_cpu", "true"])
    assert f"{path}:4: field 'response'" in err and f"{path}:6: field 'image'" in err


def test_score_stops_before_the_reward_loads(no_answers, data_dir, monkeypatch, capsys):
    monkeypatch.setattr("reward_models.registry.load_rewards", lambda specs: pytest.fail("the reward was loaded"))
    err = stops_early(capsys, ["score", "--data", str(no_answers), "--reward", "exact_match", "--out", str(data_dir / "o.jsonl")])
    assert f"{no_answers}:1: field 'answer'" in err and f"{no_answers}:8: field 'answer'" in err and "exact_match" in err
    assert not list(data_dir.glob("o.jsonl*"))


def test_ppo_stops_before_the_policy_loads(no_answers, data_dir, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("vlm_rl.ppo.load_policy_and_reference", lambda config: pytest.fail("the policy was loaded"))
    err = stops_early(capsys, ["ppo", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(no_answers),
                               "--output_dir", str(data_dir / "out"), "--use_cpu", "true", "--report_to", "none"])
    assert f"{no_answers}:2: field 'image'" in err and f"{no_answers}:2: field 'answer'" in err and f"{no_answers}:8: field 'answer'" in err


def test_train_reward_stops_before_the_model_loads(synthetic_data_dir, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from reward_models.vlm_reward import VLMRewardModel

    rows = read_jsonl(synthetic_data_dir / "preferences.jsonl")[:4]
    for row in rows:
        row["image"] = str(synthetic_data_dir / row["image"])
    del rows[2]["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(VLMRewardModel, "from_base", classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    err = stops_early(capsys, ["train-reward", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(path),
                               "--output_dir", str(tmp_path / "rm")])
    assert f"{path}:3: field 'chosen'" in err


# ------------------------------------------------------------------------ the columns rewards read; servers; bad rows

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


@pytest.fixture()
def llava_without_answer(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "imgs", tmp_path / "imgs")
    row = {k: v for k, v in json.loads((FIXTURES / "llava.json").read_text())[0].items() if k != "answer"}
    path = tmp_path / "llava.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def test_a_missing_answer_names_the_option_and_the_map(llava_without_answer, capsys):
    with pytest.raises(SystemExit):
        cli_main(["validate-data", str(llava_without_answer), "--reward", "exact_match", "--show", "0"])
    (problem, _) = capsys.readouterr().out.strip().splitlines()
    assert problem == (
        f"{llava_without_answer}:1: field 'answer': missing (needed by reward exact_match; exact_match(answer_column=COLUMN) "
        "reads another column). Add the column to every row, or map one onto it with --column_map SOURCE=answer."
    )


def test_validate_data_and_ppo_agree_on_the_columns_a_reward_sees(llava_without_answer):
    """`answer_column=C` passes the check exactly when PPO's reward batch (`reward_kwargs`) has C: `completion` (the
    final gpt turn) yes, `conversations` (the prompt) no; and exact_match then runs on that batch."""
    from reward_models.registry import load_reward, reward_columns
    from vlm_rl.data.formats import load_samples, reward_kwargs

    samples = list(load_samples(llava_without_answer))
    batch = reward_kwargs(samples)
    raw = json.loads(llava_without_answer.read_text())
    for column in [*raw, "completion", "_source"]:
        spec = f"exact_match(answer_column={column})"
        report = check_data(llava_without_answer, "ppo", required_columns=reward_columns(spec))
        assert (not report.problems) == (column in batch), column
    assert "conversations" not in batch
    reward = load_reward("exact_match(answer_column=completion)")
    assert reward([s["prompt"] for s in samples], ["Red."], **batch) == [1.0]


def test_a_reward_server_is_asked_whether_it_is_up_and_what_it_reads(llava_without_answer, capsys):
    import socket

    from reward_models.server import running_server

    with running_server("exact_match") as server:
        with pytest.raises(SystemExit):
            cli_main(["validate-data", str(llava_without_answer), "--reward", server.url, "--show", "0"])
        out = capsys.readouterr().out
        assert f"field 'answer': missing (needed by reward exact_match at {server.url})" in out  # the name /health gives
        cli_main(["validate-data", str(FIXTURES / "llava.json"), "--reward", server.url])
        assert capsys.readouterr().out.strip().endswith("no problems")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit) as info:
        cli_main(["validate-data", str(FIXTURES / "llava.json"), "--reward", url])
    assert info.value.code == 2 and f"reward server {url} is unreachable" in capsys.readouterr().err


def test_skip_bad_rows_says_whether_a_run_would_go_ahead(data_dir, capsys):
    rows = read_jsonl(data_dir / "test.jsonl")  # 8 rows
    rows[2]["image"] = "images/missing.png"
    path = data_dir / "one_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["validate-data", str(path), "--skip_bad_rows", "--max_bad_row_fraction", "0.125", "--show", "0"]) is None
    assert "a run would skip these 1 row(s) and go ahead" in capsys.readouterr().out
    report = check_data(path, "ppo")
    (record,) = report.rows_to_skip(True, 0.125).records
    assert record == {"file": str(path), "line": 3, "source": f"{path}:3",
                      "reason": f"field 'image': image file {data_dir / 'images' / 'missing.png'} does not exist. "
                                "Fix the path (relative to the data file) or remove the row."}
    with pytest.raises(DataError, match=r"1 of 8 rows are bad, more than max_bad_row_fraction=0\.1 allows"):
        report.rows_to_skip(True, 0.1)
    with pytest.raises(DataError, match=r"1 problem\(s\) in 1 of 8 row"):
        report.rows_to_skip(False, 1.0)  # without the flag: today's behaviour


def test_sft_notes_conversations_with_several_answers():
    report = check_data(FIXTURES / "llava_multi_turn.json", "sft")
    assert not report.problems and report.notes == [
        "1 row(s) hold several assistant turns: SFT trains on every assistant turn (TRL's assistant_only_loss), the earlier ones included"
    ]


def test_a_row_with_two_problems_lists_both(data_dir, tiny_processor):
    rows = read_jsonl(data_dir / "test.jsonl")
    # A missing image AND no answer for exact_match: both named, not the first only.
    bad = {k: v for k, v in rows[0].items() if k != "answer"} | {"image": "images/missing.png"}
    path = data_dir / "two.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [bad, *rows[1:3]]) + "\n")
    report = check_data(path, "ppo", processor=tiny_processor, required_columns={"answer": "exact_match"})
    assert sorted((p.line, p.field) for p in report.problems) == [(1, "answer"), (1, "image")]
    assert report.rows == 3 and report.bad_rows == 1


def test_a_dataset_directory_is_read_at_its_train_split_unless_told(data_dir, tmp_path, capsys):
    import datasets

    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    for row in rows:
        row["image"] = str(data_dir / row["image"])
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(folder))
    assert cli_main(["validate-data", str(folder), "--reward", "exact_match"]) is None
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{folder}: 3 row(s) checked for ppo: no problems"
    assert cli_main(["validate-data", str(folder), "--split", "test", "--reward", "exact_match"]) is None
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{folder}: {len(rows) - 3} row(s) checked for ppo: no problems"


def test_the_row_as_loaded_is_shown_in_its_own_characters(data_dir, tmp_path, capsys):
    row = json.loads((data_dir / "test.jsonl").read_text().splitlines()[0])
    row["image"], row["prompt"] = str(data_dir / row["image"]), "Quelle couleur a le carré ? 正方形"
    path = tmp_path / "accents.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert cli_main(["validate-data", str(path)]) is None
    assert "Quelle couleur a le carré ? 正方形" in capsys.readouterr().out
