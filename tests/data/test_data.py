"""Every dataset format loads into the same normal form; bad data fails early with file:line, field and fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_rl.data.formats import DataError, load_samples, to_rgb

QUESTION = "What colour is the square?"
EXTRA = {"answer": "red", "task": "colour"}
EXPECTED_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One logical sample (image img/a.png, QUESTION, completion 'red', columns EXTRA) in every format."""
    d = tmp_path_factory.mktemp("formats")
    (d / "img").mkdir()
    Image.fromarray(pattern(30, 20, 0)).save(d / "img" / "a.png")
    Image.fromarray(pattern(16, 24, 1)).save(d / "img" / "b.png")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    write_jsonl(
        d / "trl_prompt_completion.jsonl",
        [{"prompt": [user], "completion": [{"role": "assistant", "content": "red"}], "images": ["img/a.png"], **EXTRA}],
    )
    write_jsonl(d / "trl_completion_string.jsonl", [{"prompt": [user], "completion": "red", "images": ["img/a.png"], **EXTRA}])
    write_jsonl(
        d / "trl_messages.jsonl",
        [{"messages": [user, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": ["img/a.png"], **EXTRA}],
    )
    llava = {"image": "img/a.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}], **EXTRA}
    (d / "llava.json").write_text(json.dumps([llava], indent=2), encoding="utf-8")
    write_jsonl(d / "llava.jsonl", [llava])
    write_jsonl(d / "plain.jsonl", [{"image": "img/a.png", "prompt": QUESTION, "response": "red", **EXTRA}])

    import datasets

    image_path = str(d / "img" / "a.png")
    plain = datasets.Dataset.from_dict({"image": [image_path], "prompt": [QUESTION], "response": ["red"], **{k: [v] for k, v in EXTRA.items()}})
    plain.cast_column("image", datasets.Image()).save_to_disk(str(d / "saved_plain"))
    trl = datasets.Dataset.from_dict(
        {"prompt": [[user]], "images": [[image_path]], "completion": ["red"], **{k: [v] for k, v in EXTRA.items()}}
    )
    trl.cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(str(d / "saved_trl"))
    # Image paths kept as strings: relative to the dataset directory.
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": ["img/a.png"], "prompt": [QUESTION], "response": ["red"], **{k: [v] for k, v in EXTRA.items()}})}).save_to_disk(
        str(d / "saved_dict_paths")
    )
    shutil.copytree(d / "img", d / "saved_dict_paths" / "img")
    return d


FORMATS = [
    ("trl_prompt_completion.jsonl", "train"),
    ("trl_completion_string.jsonl", "train"),
    ("trl_messages.jsonl", "train"),
    ("llava.json", "train"),
    ("llava.jsonl", "train"),
    ("plain.jsonl", "train"),
    ("saved_plain", "train"),
    ("saved_trl", "train"),
    ("saved_dict_paths", "test"),
]


@pytest.mark.parametrize("name, split", FORMATS)
def test_every_format_gives_the_same_normal_form(data_dir, name, split):
    samples = load_samples(data_dir / name, split=split)
    assert len(samples) == 1
    s = samples[0]
    assert s["prompt"] == EXPECTED_PROMPT
    assert s["completion"] == "red"
    assert len(s["images"]) == 1
    image = s["images"][0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (30, 20)
    assert np.array_equal(np.asarray(image), pattern(30, 20, 0))
    assert s["videos"] == []
    assert {k: v for k, v in s.items() if k not in ("prompt", "images", "videos", "completion", "_source")} == EXTRA
    assert str(data_dir / name) in s["_source"]


def test_normal_form_from_all_formats_is_identical(data_dir):
    def key(s):
        return (json.dumps(s["prompt"]), s["completion"], np.asarray(s["images"][0]).tobytes(), json.dumps({k: v for k, v in s.items() if k not in ("prompt", "images", "completion", "_source")}, sort_keys=True))

    keys = {key(load_samples(data_dir / name, split=split)[0]) for name, split in FORMATS}
    assert len(keys) == 1


def test_prompt_without_completion_and_slicing(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "x.png")
    write_jsonl(tmp_path / "d.jsonl", [{"image": "x.png", "prompt": f"Q{i}"} for i in range(5)])
    samples = load_samples(tmp_path / "d.jsonl")
    assert len(samples) == 5
    assert samples[0]["completion"] is None
    assert [s["prompt"][0]["content"][1]["text"] for s in samples[1:4]] == ["Q1", "Q2", "Q3"]
    assert [s["prompt"][0]["content"][1]["text"] for s in samples][-1] == "Q4"
    # A row without an image is a text-only prompt.
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Just text"}])
    (s,) = load_samples(tmp_path / "t.jsonl")
    assert s["images"] == [] and s["prompt"] == [{"role": "user", "content": [{"type": "text", "text": "Just text"}]}]


def test_two_images_keep_their_order_in_every_format(data_dir, tmp_path):
    a, b = str(data_dir / "img" / "a.png"), str(data_dir / "img" / "b.png")  # absolute paths work too
    expected = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " or "}, {"type": "image"}, {"type": "text", "text": ": which is wider?"}]}]
    write_jsonl(tmp_path / "plain.jsonl", [{"image": [a, b], "prompt": "<image> or <image>: which is wider?"}])
    write_jsonl(tmp_path / "llava.jsonl", [{"image": [a, b], "conversations": [{"from": "human", "value": "<image> or <image>: which is wider?"}]}])
    write_jsonl(tmp_path / "trl.jsonl", [{"prompt": expected, "images": [a, b]}])
    for name in ("plain.jsonl", "llava.jsonl", "trl.jsonl"):
        (s,) = load_samples(tmp_path / name)
        assert s["prompt"] == expected, name
        assert [im.size for im in s["images"]] == [(30, 20), (16, 24)]
        assert s["completion"] is None
    # Plain prompts without placeholders get one image part per image, in front.
    write_jsonl(tmp_path / "front.jsonl", [{"image": [a, b], "prompt": "Compare."}])
    (s,) = load_samples(tmp_path / "front.jsonl")
    assert s["prompt"][0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]


def test_llava_multi_turn_and_system(data_dir, tmp_path):
    row = {
        "image": str(data_dir / "img" / "a.png"),
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A pattern."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Many."},
        ],
    }
    write_jsonl(tmp_path / "l.jsonl", [row])
    (s,) = load_samples(tmp_path / "l.jsonl")
    assert s["prompt"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ]
    assert s["completion"] == "Many."


def test_trl_format_accepts_a_single_image_column(data_dir, tmp_path):
    shutil.copytree(data_dir / "img", tmp_path / "img")
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": EXPECTED_PROMPT, "image": "img/a.png"}])
    (s,) = load_samples(tmp_path / "e.jsonl")
    assert s["prompt"] == EXPECTED_PROMPT and len(s["images"]) == 1


# ---------------------------------------------------------------- paths


def test_image_paths_resolve_relative_to_the_data_file(data_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    for name in ("plain.jsonl", "llava.json", "trl_messages.jsonl", "saved_dict_paths"):
        split = "test" if name == "saved_dict_paths" else "train"
        (s,) = load_samples(data_dir / name, split=split)
        assert np.array_equal(np.asarray(s["images"][0]), pattern(30, 20, 0))
    # A relative data path from another working directory, too.
    shutil.copytree(data_dir, tmp_path / "copy")
    (s,) = load_samples(Path("..") / ".." / "copy" / "plain.jsonl")
    assert np.array_equal(np.asarray(s["images"][0]), pattern(30, 20, 0))


def test_a_directory_of_split_files(synthetic_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, test = load_samples(synthetic_data_dir), load_samples(synthetic_data_dir, split="test")
    assert len(train) == 32 and len(test) == 8
    assert train[0]["_source"] == f"{synthetic_data_dir / 'train.jsonl'}:1"
    assert train[0]["images"][0].mode == "RGB"
    assert {"answer", "task", "wrong_answer"} <= set(train[0])
    assert train[0]["completion"] == train[0]["answer"]


def test_sources_name_file_and_line(data_dir, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    write_jsonl(tmp_path / "d.jsonl", [{"image": "x.png", "prompt": "A"}, "", "   ", {"image": "x.png", "prompt": "B"}])
    assert [s["_source"] for s in load_samples(tmp_path / "d.jsonl")] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:4"]
    # A pretty-printed .json list: the line each sample starts on (and its index, unique even on one line).
    assert load_samples(data_dir / "llava.json")[0]["_source"] == f"{data_dir / 'llava.json'}:2 (item 0)"
    rows = [{"image": "x.png", "prompt": p} for p in "ABC"]
    (tmp_path / "one_line.json").write_text(json.dumps(rows))
    sources = [s["_source"] for s in load_samples(tmp_path / "one_line.json")]
    assert sources == [f"{tmp_path / 'one_line.json'}:1 (item {i})" for i in range(3)]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=1))
    sources = [s["_source"] for s in load_samples(tmp_path / "pretty.json")]
    assert sources == [f"{tmp_path / 'pretty.json'}:{line} (item {i})" for i, line in enumerate((2, 6, 10))]


# ---------------------------------------------------------------- image modes -> RGB


def _rgba():
    a = np.zeros((6, 6, 4), np.uint8)
    a[:, 3:] = (10, 200, 30, 255)  # right half opaque green, left half fully transparent
    return Image.fromarray(a, "RGBA"), (255, 255, 255), (10, 200, 30)


def _la():
    a = np.zeros((6, 6, 2), np.uint8)
    a[:, 3:] = (100, 255)
    return Image.fromarray(a, "LA"), (255, 255, 255), (100, 100, 100)


def _l():
    a = np.full((6, 6), 77, np.uint8)
    a[:, 3:] = 200
    return Image.fromarray(a, "L"), (77, 77, 77), (200, 200, 200)


def _p(transparent: bool):
    image = Image.new("P", (6, 6), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    for y in range(6):
        for x in range(3, 6):
            image.putpixel((x, y), 1)
    if transparent:
        image.info["transparency"] = 0
    return image, (255, 255, 255) if transparent else (10, 20, 30), (200, 100, 50)


def _cmyk():
    image = Image.new("CMYK", (6, 6), (0, 0, 0, 0))  # white
    image.paste((0, 255, 255, 0), (3, 0, 6, 6))  # red
    return image, (255, 255, 255), (255, 0, 0)


def _i16(mode: str):
    image = Image.new(mode, (6, 6))
    for y in range(6):
        for x in range(6):
            image.putpixel((x, y), 0 if x < 3 else 40000)  # 40000 / 256 -> 156
    return image, (0, 0, 0), (156, 156, 156)


def _bilevel():
    image = Image.new("1", (6, 6), 0)
    image.paste(1, (3, 0, 6, 6))
    return image, (0, 0, 0), (255, 255, 255)


MODES = {
    "RGBA.png": _rgba,
    "LA.png": _la,
    "L.png": _l,
    "P.png": lambda: _p(False),
    "P-transparent.png": lambda: _p(True),
    "CMYK.tiff": _cmyk,
    "CMYK.jpg": _cmyk,
    "I16.png": lambda: _i16("I;16"),
    "I16B.tiff": lambda: _i16("I;16B"),
    "1.png": _bilevel,
}


@pytest.mark.parametrize("filename", list(MODES))
def test_every_image_mode_loads_as_rgb_with_sensible_pixels(tmp_path, filename):
    image, left, right = MODES[filename]()
    image.save(tmp_path / filename)
    with Image.open(tmp_path / filename) as reopened:
        assert reopened.mode == image.mode  # the file really holds that mode
    write_jsonl(tmp_path / "d.jsonl", [{"image": filename, "prompt": "Q"}])
    (s,) = load_samples(tmp_path / "d.jsonl")
    out = np.asarray(s["images"][0]).astype(int)
    assert s["images"][0].mode == "RGB" and out.shape == (6, 6, 3)
    tolerance = 8 if filename.endswith(".jpg") else 0
    assert np.abs(out[:, :2] - left).max() <= tolerance, out[0]
    assert np.abs(out[:, 4:] - right).max() <= tolerance, out[0]


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("PA", (2, 2), (1, 0)), (255, 255, 255)),  # palette + alpha, transparent -> white
        (Image.new("I", (2, 2), 40000), (156, 156, 156)),  # 32-bit int holding 16-bit values
        (Image.new("I", (2, 2), 77), (77, 77, 77)),  # 32-bit int holding 8-bit values
        (Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3)),
    ],
)
def test_to_rgb_in_memory_modes(image, expected):
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[0, 0]) == expected


# ---------------------------------------------------------------- errors


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_samples(path, **kwargs)
    return str(info.value)


GOOD = {"image": "ok.png", "prompt": "What colour?", "response": "red"}


@pytest.fixture()
def errdir(tmp_path) -> Path:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ok.png")
    return tmp_path


def assert_names(message: str, path: Path, line: int, field: str) -> None:
    assert f"{path.name}:{line}" in message, message
    assert f"'{field}'" in message, message


def test_missing_image_file(errdir):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, {**GOOD, "image": "images/missing.png"}])
    message = load_error(path)
    assert_names(message, path, 2, "image")
    assert "missing.png" in message and "does not exist" in message


def test_missing_image_is_reported_on_access_without_check_images(errdir):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, {**GOOD, "image": "missing.png"}])
    samples = load_samples(path, check_images=False)
    assert samples[0]["images"][0].size == (8, 8)
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'image'"):
        samples[1]


def test_unreadable_image(errdir):
    (errdir / "garbage.png").write_bytes(b"\x89PNG this is not really an image")
    path = write_jsonl(errdir / "d.jsonl", [GOOD, GOOD, {**GOOD, "image": "garbage.png"}])
    message = load_error(path)
    assert_names(message, path, 3, "image")
    assert "garbage.png" in message and "cannot be read" in message


def test_malformed_json_line_names_its_line(errdir):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, GOOD, '{"image": "ok.png", "prompt": "Q",', GOOD])
    message = load_error(path)
    assert "d.jsonl:3" in message and "malformed JSON" in message


def test_malformed_json_list_names_its_line(errdir):
    path = errdir / "d.json"
    path.write_text('[\n  {"image": "ok.png", "prompt": "Q"},\n  {"image": "ok.png" "prompt": "Q"}\n]\n')
    message = load_error(path)
    assert "d.json:3" in message and "malformed JSON" in message


def test_json_that_is_not_a_list(errdir):
    path = errdir / "d.json"
    path.write_text(json.dumps(GOOD))
    assert "expected a JSON list" in load_error(path)


@pytest.mark.parametrize(
    "row, field",
    [
        ({"image": "ok.png", "response": "red"}, "prompt"),
        ({"image": "ok.png", "prompt": "   "}, "prompt"),
        ({"image": "ok.png", "prompt": 42}, "prompt"),
        ({"prompt": [], "images": ["ok.png"]}, "prompt"),
        ({"prompt": [{"role": "user"}], "images": []}, "prompt[0]"),
        ({"prompt": [{"role": "user", "content": ["not a part"]}], "images": []}, "prompt[0].content[0]"),
        ({"prompt": [{"role": "user", "content": 5}], "images": []}, "prompt[0].content"),
        ({"prompt": [{"role": "user", "content": "Q"}], "completion": 7}, "completion"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]}, "messages[1].content"),
        ({"messages": []}, "messages"),
        ({"image": "ok.png", "prompt": "Q", "response": ["red"]}, "response"),
    ],
)
def test_bad_prompt_fields(errdir, row, field):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, row])
    assert_names(load_error(path), path, 2, field)


@pytest.mark.parametrize(
    "row, field, counts",
    [
        # too many placeholders
        ({"image": "ok.png", "prompt": "<image> and <image>: same?"}, "image", "1 image(s) but 2"),
        ({"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nQ"}]}, "image", "1 image(s) but 2"),
        ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], "images": []}, "images", "0 image(s) but 1"),
        ({"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}, "images", "0 image(s) but 1"),
        # too few placeholders
        ({"image": ["ok.png", "ok.png"], "prompt": "<image> Q"}, "image", "2 image(s) but 1"),
        ({"image": ["ok.png", "ok.png"], "conversations": [{"from": "human", "value": "<image>\nQ"}]}, "image", "2 image(s) but 1"),
        ({"image": "ok.png", "conversations": [{"from": "human", "value": "Q"}]}, "image", "1 image(s) but 0"),
        ({"messages": [{"role": "user", "content": "Q"}], "images": ["ok.png"]}, "images", "1 image(s) but 0"),
    ],
)
def test_placeholder_count_must_match_images(errdir, row, field, counts):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, GOOD, row])
    message = load_error(path)
    assert_names(message, path, 3, field)
    assert counts in message and "<image>" in message


@pytest.mark.parametrize(
    "conversations, field",
    [
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "robot", "value": "A"}], "conversations[1]"),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt"}], "conversations[1]"),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": 5}], "conversations[1]"),
        ([{"value": "<image>\nQ"}], "conversations[0]"),
        (["human: hi"], "conversations[0]"),
        ([], "conversations"),
        ("human: hi", "conversations"),
    ],
)
def test_llava_bad_turns(errdir, conversations, field):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, {"image": "ok.png", "conversations": conversations}])
    message = load_error(path)
    assert_names(message, path, 2, field)
    assert "from" in message or "list" in message


def test_row_that_is_not_an_object(errdir):
    path = write_jsonl(errdir / "d.jsonl", [GOOD, "[1, 2]"])
    message = load_error(path)
    assert "d.jsonl:2" in message and "JSON object" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(errdir, content):
    path = errdir / "d.jsonl"
    path.write_text(content)
    message = load_error(path)
    assert "d.jsonl" in message and "no samples" in message


def test_empty_json_list(errdir):
    path = errdir / "d.json"
    path.write_text("[]")
    assert "no samples" in load_error(path)


def test_unsupported_extension(errdir):
    path = errdir / "d.txt"
    path.write_text("image,prompt\nok.png,Q\n")
    message = load_error(path)
    assert "d.txt" in message and "unsupported file type '.txt'" in message and ".jsonl" in message and ".parquet" in message


def test_nonexistent_path(tmp_path):
    message = load_error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "no such file" in message


def test_missing_split_of_a_saved_dataset_dict(data_dir):
    message = load_error(data_dir / "saved_dict_paths", split="train")
    assert "saved_dict_paths" in message and "'train'" in message and "test" in message


def test_directory_datasets_cannot_read_is_a_data_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.bin").write_bytes(b"\x00\x01")
    message = load_error(tmp_path / "d")
    assert str(tmp_path / "d") in message
