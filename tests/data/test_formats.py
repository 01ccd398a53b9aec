"""Data as people keep it: every format of the README's table loads to the same normal form, nothing is dropped.

The fixtures in tests/data/fixtures/formats/ are the README's example rows (one row each, the same picture and
question); the table files (.parquet, .arrow, dataset directories) are built from them here.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import stops_early
from vlm_rl.cli import main as cli_main
from vlm_rl.data.formats import DataError, load_samples
from vlm_rl.data.readers import column_map_option, parse_column_map
from vlm_rl.data.validate import check_data

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
README = Path(__file__).parents[2] / "README.md"
QUESTION = "What colour is the square?"
EXPECTED_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
COLUMN_MAP = "question=prompt,img=image,label=answer"
JSON_FIXTURES = ["trl.jsonl", "trl_messages.jsonl", "llava.json", "plain.jsonl", "plain.csv", "openai.jsonl",
                 "openai_base64.jsonl", "qwen.jsonl"]


def picture() -> np.ndarray:
    return np.asarray(Image.open(FIXTURES / "imgs" / "0.png").convert("RGB"))


def fixture_row(name: str) -> dict:
    text = (FIXTURES / name).read_text()
    return json.loads(text)[0] if name.endswith(".json") else json.loads(text.splitlines()[0])


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """The same row as tables and dataset directories: images as bytes, as paths, or as PIL images in message parts."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("tables")
    shutil.copytree(FIXTURES / "imgs", d / "imgs")
    png = (FIXTURES / "imgs" / "0.png").read_bytes()
    plain = {"prompt": QUESTION, "response": "red", "answer": "red"}
    # Images embedded as bytes (datasets' Image feature) in a single parquet file.
    embedded = datasets.Dataset.from_list([{"image": {"bytes": png, "path": None}, **plain}])
    embedded.cast_column("image", datasets.Image()).to_parquet(str(d / "plain_bytes.parquet"))
    # Qwen messages as a table: every part gets every key (None where absent); the image a relative path.
    pq.write_table(pa.Table.from_pylist([fixture_row("qwen.jsonl")]), d / "qwen.parquet")
    # OpenAI messages as one Arrow IPC file (a column holds one type: the answer as a list of parts too).
    openai = fixture_row("openai.jsonl")
    openai["messages"][1]["content"] = [{"type": "text", "text": "red"}]
    with pa.ipc.new_file(d / "openai.arrow", (table := pa.Table.from_pylist([openai])).schema) as writer:
        writer.write_table(table)
    # TRL rows saved by datasets (a DatasetDict with a test split), images as an Image sequence.
    trl = fixture_row("trl.jsonl")
    trl_ds = datasets.Dataset.from_list([{**trl, "images": [str(d / "imgs" / "0.png")]}])
    trl_ds = trl_ds.cast_column("images", datasets.List(datasets.Image()))
    datasets.DatasetDict({"test": trl_ds}).save_to_disk(str(d / "saved_trl"))
    # One of save_to_disk's .arrow shards (an IPC stream) given as a single file.
    shutil.copy(next((d / "saved_trl" / "test").glob("*.arrow")), d / "trl_stream.arrow")
    # Qwen parts holding PIL images in a datasets column.
    image = Image.open(FIXTURES / "imgs" / "0.png")
    qwen = fixture_row("qwen.jsonl")
    qwen["messages"][0]["content"][0]["image"] = image
    datasets.Dataset.from_list([qwen]).save_to_disk(str(d / "saved_qwen_pil"))
    # A folder of data files (datasets.load_dataset reads it), paths relative to the folder.
    (d / "folder").mkdir()
    shutil.copytree(FIXTURES / "imgs", d / "folder" / "imgs")
    pq.write_table(pa.Table.from_pylist([fixture_row("plain.jsonl")]), d / "folder" / "train.parquet")
    return d


TABLES = [("plain_bytes.parquet", "train"), ("qwen.parquet", "train"), ("openai.arrow", "train"), ("saved_trl", "test"),
          ("trl_stream.arrow", "train"), ("saved_qwen_pil", "train"), ("folder", "train")]


def every_format(tables: Path) -> list[tuple[Path, str, str | None]]:
    """(path, split, column map) of the same content in every supported format."""
    return ([(FIXTURES / name, "train", None) for name in JSON_FIXTURES] + [(tables / name, split, None) for name, split in TABLES]
            + [(FIXTURES / "question.jsonl", "train", COLUMN_MAP)])


def test_every_format_loads_the_image_the_question_and_the_answer(tables):
    for path, split, column_map in every_format(tables):
        (sample,) = load_samples(path, split=split, column_map=column_map)
        assert sample["prompt"] == EXPECTED_PROMPT, path
        assert len(sample["images"]) == 1, path  # never dropped
        assert np.array_equal(np.asarray(sample["images"][0]), picture()), path
        assert sample["answer"] == "red", path
        assert sample["completion"] == (None if column_map else "red"), path


def test_validate_data_shows_the_same_normal_form_for_every_format(tables, capsys):
    shown = {}
    for path, split, column_map in every_format(tables):
        argv = ["validate-data", str(path), "--split", split, "--reward", "exact_match"] + (["--column_map", column_map] if column_map else [])
        cli_main(argv)
        first, summary = capsys.readouterr().out.strip().splitlines()
        assert summary.endswith("no problems"), summary
        source, loaded = first.split(" as loaded: ")
        assert source.startswith(str(path)), source
        shown[path.name] = json.loads(loaded)
        shown[path.name]["completion"] = None  # the mapped question file has no reference response
    assert len({json.dumps(s, sort_keys=True) for s in shown.values()}) == 1, shown
    (one,) = {json.dumps(s, sort_keys=True) for s in shown.values()}
    assert json.loads(one)["images"] == [f"56x56 sha256:{__import__('hashlib').sha256(picture().tobytes()).hexdigest()[:12]}"]


def test_openai_image_parts_were_never_dropped(tmp_path):
    """The silent-drop case: the image_url part is the sample's image, and its absence is an error, not a text part."""
    (sample,) = load_samples(FIXTURES / "openai.jsonl")
    assert [p["type"] for p in sample["prompt"][0]["content"]] == ["image", "text"] and len(sample["images"]) == 1
    row = fixture_row("openai.jsonl")
    row["messages"][0]["content"][0] = {"type": "image_url", "image_url": {}}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'messages\[0\]\.content\[0\]': an image_url part needs image_url\.url"):
        load_samples(tmp_path / "d.jsonl")


@pytest.mark.parametrize(
    "part, named",
    [
        ({"type": "input_audio", "input_audio": {"data": "..."}}, "audio is not supported"),
        ({"type": "image_file", "file_id": "x"}, "content part of type 'image_file' is not understood"),
    ],
)
def test_a_part_that_is_not_understood_is_named_never_dropped(tmp_path, part, named):
    row = fixture_row("qwen.jsonl")
    row["messages"][0]["content"].insert(1, part)
    (tmp_path / "d.jsonl").write_text(json.dumps(fixture_row("qwen.jsonl")) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_samples(tmp_path / "d.jsonl", check_images=False)
    assert f"{tmp_path / 'd.jsonl'}:2: field 'messages[0].content[1]': {named}" in str(info.value)


def test_inline_images_in_every_source_form(tmp_path):
    """Qwen parts with a path, an absolute path, a file:// URI and a data: URI all give the picture."""
    shutil.copytree(FIXTURES / "imgs", tmp_path / "imgs")
    uri = "data:image/png;base64," + base64.b64encode((FIXTURES / "imgs" / "0.png").read_bytes()).decode()
    sources = ["imgs/0.png", str(tmp_path / "imgs" / "0.png"), f"file://{tmp_path / 'imgs' / '0.png'}", uri]
    rows = []
    for source in sources:
        row = fixture_row("qwen.jsonl")
        row["messages"][0]["content"][0]["image"] = source
        rows.append(json.dumps(row))
    (tmp_path / "q.jsonl").write_text("\n".join(rows) + "\n")
    samples = load_samples(tmp_path / "q.jsonl")
    assert [np.array_equal(np.asarray(s["images"][0]), picture()) for s in samples] == [True] * 4


def test_urls_are_named_whole_and_say_to_download_first(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "https://example.com/cat.png", "prompt": QUESTION}) + "\n")
    with pytest.raises(DataError) as info:
        load_samples(tmp_path / "d.jsonl")
    message = str(info.value)
    assert "image https://example.com/cat.png is a URL" in message and "Download the images first" in message


def test_a_bad_data_uri_is_named(tmp_path):
    row = fixture_row("openai_base64.jsonl")
    row["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,not*base64"
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'messages\[0\]\.content\[0\]': the base64 data"):
        load_samples(tmp_path / "d.jsonl")


def test_images_column_and_inline_images_must_agree(tmp_path):
    """A row with inline images and an `images` column for no placeholder is refused, not half-read."""
    row = {**fixture_row("qwen.jsonl"), "images": ["imgs/0.png"]}
    shutil.copytree(FIXTURES / "imgs", tmp_path / "imgs")
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"field 'images': 1 image\(s\) but 0 image placeholder\(s\) in the prompt \(1 more part"):
        load_samples(tmp_path / "d.jsonl")


# ------------------------------------------------------------------------------------------ --column_map


def test_a_question_column_needs_a_map_and_the_error_says_which(tmp_path, capsys):
    with pytest.raises(DataError, match=r"no prompt found .* --column_map COLUMN=prompt \(e\.g\. question=prompt\)"):
        load_samples(FIXTURES / "question.jsonl")
    err = stops_early(capsys, ["ppo", "--train_data", str(FIXTURES / "question.jsonl"), "--column_map", "question=prompt,img=image",
                         "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"])
    assert "field 'answer': missing (needed by reward exact_match; exact_match(answer_column=COLUMN) reads another column)" in err
    assert "--column_map SOURCE=answer" in err
    assert not (tmp_path / "run").exists()


def test_column_map_forms_and_mistakes(tmp_path):
    assert parse_column_map("question=prompt, img = image") == {"question": "prompt", "img": "image"}
    assert column_map_option({"question": "prompt", "img": "image"}) == "question=prompt,img=image"  # YAML mapping
    for bad in ("question", "=prompt", "a=b,a=c", "a=x,b=x"):
        with pytest.raises(DataError, match="--column_map"):
            parse_column_map(bad)
    report = check_data(FIXTURES / "question.jsonl", "ppo", column_map="questoin=prompt")
    assert "--column_map names ['questoin'], which no row has" in report.problems[0].message
    (tmp_path / "d.jsonl").write_text(json.dumps({**fixture_row("question.jsonl"), "prompt": "other"}) + "\n")
    with pytest.raises(DataError, match="renames a column to 'prompt', which the row already has"):
        load_samples(tmp_path / "d.jsonl", column_map="question=prompt")


def test_column_map_in_a_yaml_config(tmp_path):
    from trl import TrlParser

    from vlm_rl.training.config import PPOConfig

    (tmp_path / "c.yaml").write_text("column_map:\n  question: prompt\n  img: image\noutput_dir: out\nuse_cpu: true\n")
    (config,) = TrlParser((PPOConfig,)).parse_args_and_config(args=["--config", str(tmp_path / "c.yaml")])
    assert config.column_map == "question=prompt,img=image"


# ------------------------------------------------------------------------------------------ the README's table


def test_every_example_row_of_the_readme_table_is_a_fixture():
    section = README.read_text().split("## Data formats", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| [^|]+ \| `(\{.*?\})` \| (`\w+\.\w+`)", section, flags=re.M)  # (a fixture: a file name)
    assert len(rows) >= 8, "the README's format table lost its rows"
    for example, name in rows:
        name = name.strip("`")
        assert json.loads(example) == fixture_row(name), name
