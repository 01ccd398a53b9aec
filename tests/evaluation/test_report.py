"""The HTML report and summary.json, built from hand-made generations."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlm_rl.evaluation.statistics import summarize
from vlm_rl.evaluation.report import filmstrip, write_report

MODELS = ["sft", "rl-step<10>"]  # a name that needs escaping too


def _generations():
    rewards = {"sft": [0.0, 1.0, 0.5, 0.0], "rl-step<10>": [1.0, 0.5, 1.0, 0.0]}
    return {
        name: [
            {"prompt_id": i, "reward": r, "eos": i != 2, "length": 5 + i, "kl_to_first": None if k == 0 else 0.1 * i}
            for i, r in enumerate(rs)
        ]
        for k, (name, rs) in enumerate(rewards.items())
    }


def _image(colour):
    im = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(im).ellipse((10, 8, 40, 38), fill=colour)
    return im


def _samples():
    return [
        {
            "image": _image("red"),
            "prompt": "What colour is the circle? <script>alert('x')</script>",
            "answer": "red",
            "responses": {"sft": {"text": "Blue & green", "reward": 0.0}, "rl-step<10>": {"text": "red", "reward": 1.0}},
        },
        {
            "image": None,
            "prompt": "No image here.",
            "answer": None,
            "responses": {"sft": {"text": "ok", "reward": None}, "rl-step<10>": {"text": "ok", "reward": 0.5}},
        },
    ]


CURVES = {
    "objective/scores": [(1, 0.1), (2, 0.3), (3, 0.35), (4, 0.6)],
    "objective/kl": [(1, 0.0), (2, 0.02), (3, 0.05), (4, 0.04)],
    "objective/entropy": [(1, 2.0), (2, 1.9), (3, 1.7), (4, 1.6)],
    "loss/value_avg": [(1, 0.9), (2, 0.5), (3, 0.4), (4, 0.3)],
}


@pytest.fixture()
def report(tmp_path):
    summary = summarize(_generations(), MODELS)
    path = write_report(tmp_path / "out", summary, CURVES, _samples(), MODELS, meta={"data": "test.jsonl"})
    return path, summary, path.read_text(encoding="utf-8")


def test_writes_both_files_and_summary_round_trips(report):
    path, summary, _ = report
    assert path == path.parent / "report.html" and path.is_file()
    assert json.loads((path.parent / "summary.json").read_text(encoding="utf-8")) == summary
    leftovers = [p.name for p in path.parent.iterdir() if p.name not in ("report.html", "summary.json")]
    assert leftovers == []  # no temporary files left behind
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_html_content(report):
    _, _, page = report
    assert page.startswith("<!DOCTYPE html>")
    assert ">sft<" in page
    assert "rl-step<10>" not in page  # every model name is escaped
    assert page.count("rl-step&lt;10&gt;") >= 3  # models table, differences table, samples header
    assert page.count("<svg") == len(CURVES)
    assert page.count("</svg>") == len(CURVES)
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == 1
    assert "no image" in page
    # Self-contained: no external resources, no scripts.
    assert not re.search(r"""(src|href)=["']https?:""", page)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "Blue &amp; green" in page
    assert "Reference" in page and "test.jsonl" in page
    assert "unscored" in page


def test_a_prompt_video_is_shown_as_a_strip_of_its_frames(tmp_path):
    import base64
    import io

    frames = [_image(c) for c in ("red", "green", "blue", "yellow", "purple", "orange", "black", "gray", "pink", "cyan")]
    strip = filmstrip(frames)
    assert strip.size == (4 * 64 + 3 * 2, 2 * 48 + 2)  # 8 frames, 4 to a row, 2 px apart
    shown = [strip.getpixel(((i % 4) * 66 + 25, (i // 4) * 50 + 23)) for i in range(8)]
    kept = [frames[round(i * 9 / 7)].getpixel((25, 23)) for i in range(8)]  # evenly spaced, the first and the last kept
    assert shown == kept and kept[0] == frames[0].getpixel((25, 23)) and kept[-1] == frames[-1].getpixel((25, 23))
    sample = {"image": None, "video": frames, "prompt": "Which colour comes last?", "answer": "cyan",
              "responses": {name: {"text": "cyan", "reward": 1.0} for name in MODELS}}
    html = write_report(tmp_path / "out", summarize(_generations(), MODELS), None, [sample], MODELS).read_text(encoding="utf-8")
    assert "video: 10 frames (8 shown)" in html and "no image" not in html
    (uri,) = re.findall(r'<img class="strip" src="data:image/png;base64,([^"]+)"', html)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).width == 256  # the strip, as a thumbnail like every picture


def test_differences_highlighted_only_when_ci_above_zero(tmp_path):
    gens = {
        "a": [{"prompt_id": i, "reward": 0.1 * i, "eos": True, "length": 3, "kl_to_first": None} for i in range(8)],
        "b": [{"prompt_id": i, "reward": 0.1 * i + 1, "eos": True, "length": 3, "kl_to_first": 0.0} for i in range(8)],
        "c": [{"prompt_id": i, "reward": 0.1 * (7 - i), "eos": True, "length": 3, "kl_to_first": 0.0} for i in range(8)],
    }
    summary = summarize(gens, ["a", "b", "c"])
    page = write_report(tmp_path, summary, {}, [], ["a", "b", "c"]).read_text(encoding="utf-8")
    assert page.count('class="sig-pos"') == 1
    assert "CI above 0" in page
    assert "No training logs found" in page
    assert "<svg" not in page


def test_per_run_curves_overlay_and_rewrite(tmp_path):
    summary = summarize(_generations(), MODELS)
    curves = {"rl-step<10>": CURVES, "other": {"objective/scores": [(1, 0.0), (5, 1.0)]}}
    path = write_report(tmp_path, summary, curves, _samples(), MODELS)
    page = path.read_text(encoding="utf-8")
    assert page.count("<svg") == len(CURVES)
    assert page.count('class="legend"') == len(CURVES)
    # Writing again replaces the files in place.
    path2 = write_report(tmp_path, summary, None, [], MODELS, title="Second")
    assert path2 == path and "<title>Second</title>" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["report.html", "summary.json"]


def test_a_multi_turn_answer_shows_each_turn_with_its_images(tmp_path):
    """`compare --tools`: each model turn's text, and each observation's text and images, in order."""
    samples = _samples()[:1]
    turns = [
        {"role": "assistant", "content": '<tool_call>{"name": "zoom"}</tool_call>'},
        {"role": "tool", "name": "zoom", "content": [{"type": "image", "image": _image("blue")}, {"type": "text", "text": "zoomed & sharp"}]},
        {"role": "assistant", "content": "blue"},
    ]
    samples[0]["responses"]["rl-step<10>"] = {"text": "blue", "reward": 1.0, "turns": turns}
    page = write_report(tmp_path, summarize(_generations(), MODELS), {}, samples, MODELS).read_text(encoding="utf-8")
    rl_cell = page.split("rl-step&lt;10&gt;")[-1]
    texts = re.findall(r'<div class="turn"><b>([^<]*)</b> <span class="resp">([^<]*)</span>', rl_cell)
    assert texts == [("model", "&lt;tool_call&gt;{&quot;name&quot;: &quot;zoom&quot;}&lt;/tool_call&gt;"), ("zoom", "zoomed &amp; sharp"), ("model", "blue")]
    assert page.count("data:image/png;base64,") == 2  # the prompt's image and, in the answer, the zoomed one
    assert re.search(r'<b>zoom</b> <span class="resp">[^<]*</span><div class="img"><img src="data:image/png;base64,', rl_cell)
