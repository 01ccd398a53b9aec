"""`vlm-rl generate`: answers from any checkpoint, written so that `vlm-rl score` reads them unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from vlm_rl.data.formats import load_samples
from vlm_rl.evaluation.generate import generate_all, run_generate, with_response
from vlm_rl.rollout.generation import make_generation_config
from vlm_rl.evaluation.score import score_file


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_keep_every_column_and_score_unchanged(tmp_path, tiny_model_dir, tiny_processor, synthetic_data_dir):
    data = synthetic_data_dir / "test.jsonl"
    out = tmp_path / "elsewhere" / "answers.jsonl"  # another directory: image paths must be re-based
    run_generate(str(tiny_model_dir), str(out), data=str(data), max_samples=6, batch_size=4, max_new_tokens=5, seed=3)
    inputs, answers = rows_of(data)[:6], rows_of(out)
    assert len(answers) == 6
    for before, after in zip(inputs, answers):
        assert {k: v for k, v in after.items() if k not in ("image", "images", "response", "reference_response")} == {
            k: v for k, v in before.items() if k not in ("image", "images", "response")
        }
        assert after.get("reference_response") == before.get("response")
    # The same answers as generating by hand with the same seeds and config.
    samples = list(load_samples(data))[:6]
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    config = make_generation_config(tiny_processor.tokenizer, 5)
    expected = [t for r in generate_all(model, tiny_processor, samples, config, 4, 3, "x") for t in tiny_processor.batch_decode(r.responses, skip_special_tokens=True)]
    assert [a["response"] for a in answers] == expected
    # `vlm-rl score` reads the file as it is: the images resolve, and the response scored is the generated one.
    scored = tmp_path / "scored.jsonl"
    score_file(str(out), ["exact_match", "length(min_length=100, unit=chars)"], str(scored), progress=False)
    rows = rows_of(scored)
    assert len(rows) == 6 and len({a["response"] for a in answers}) > 1
    for answer, row in zip(answers, rows):
        assert row["score_length"] == pytest.approx(len(answer["response"].strip()) / 100)  # n / min_length below it


def test_conversational_rows_carry_the_answer_in_their_answer_turn():
    messages = {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}], "images": ["a.png"]}
    out = with_response(messages, "blue")
    assert out["messages"][-1] == {"role": "assistant", "content": "blue"} and len(out["messages"]) == 2
    assert out["reference_response"] == "red" and out["response"] == "blue"
    llava = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}]}
    assert with_response(llava, "blue")["conversations"][-1] == {"from": "gpt", "value": "blue"}
    trl = {"prompt": [{"role": "user", "content": "Colour?"}], "completion": [{"role": "assistant", "content": "red"}]}
    out = with_response(trl, "blue")
    assert out["completion"] == [{"role": "assistant", "content": "blue"}] and out["reference_response"] == trl["completion"]
    assert messages["messages"][-1]["content"] == "red"  # the input row is not modified


def test_a_lora_adapter_answers_like_its_merged_model(tmp_path, tiny_model_dir, synthetic_data_dir):
    from peft import get_peft_model

    from vlm_rl.models.families import get_family
    from vlm_rl.models.loading import language_model_lora_config

    torch.manual_seed(0)
    model = get_peft_model(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir), language_model_lora_config(4, 8, 0.0, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], get_family("qwen2_vl")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 3.0)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        (tmp_path / "merged" / name).write_bytes((tiny_model_dir / name).read_bytes())
    answers = {}
    for name in ("adapter", "merged"):
        out = run_generate(str(tmp_path / name), str(tmp_path / f"{name}.jsonl"), data=str(synthetic_data_dir / "test.jsonl"), max_samples=4, max_new_tokens=4)
        answers[name] = [r["response"] for r in rows_of(out)]
    base = run_generate(str(tiny_model_dir), str(tmp_path / "base.jsonl"), data=str(synthetic_data_dir / "test.jsonl"), max_samples=4, max_new_tokens=4)
    assert answers["adapter"] == answers["merged"] != [r["response"] for r in rows_of(base)]


def test_one_image_and_prompt(tmp_path, tiny_model_dir, synthetic_data_dir, capsys):
    from vlm_rl.evaluation.generate import main

    image = next((synthetic_data_dir).rglob("*.png"))
    main(["--model", str(tiny_model_dir), "--image", str(image), "--prompt", "What colour is it?", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.strip() != ""
    out = tmp_path / "one.jsonl"
    main(["--model", str(tiny_model_dir), "--image", str(image), "--prompt", "What colour is it?", "--out", str(out)])
    [row] = rows_of(out)
    assert row["prompt"] == "What colour is it?" and "response" in row


def test_inline_and_embedded_images_stay_valid_from_the_output(tmp_path, tiny_model_dir):
    """Qwen and OpenAI image parts (relative paths), and a mapped question file, answered into another directory:
    the output loads with the same picture, and the skipped row is named beside it."""
    import numpy as np

    fixtures = Path(__file__).parents[1] / "data" / "fixtures" / "formats"
    picture = np.asarray(load_samples(fixtures / "plain.jsonl")[0]["images"][0])
    for name, extra in [("qwen.jsonl", {}), ("openai.jsonl", {}), ("question.jsonl", {"column_map": "question=prompt,img=image"})]:
        out = tmp_path / "elsewhere" / f"{name}.out.jsonl"
        run_generate(str(tiny_model_dir), str(out), data=str(fixtures / name), max_new_tokens=2, **extra)
        (sample,) = load_samples(out)
        assert np.array_equal(np.asarray(sample["images"][0]), picture), name
        assert sample["completion"] == rows_of(out)[0]["response"], name
    data = tmp_path / "two.jsonl"
    good = json.loads((fixtures / "qwen.jsonl").read_text())
    good["messages"][0]["content"][0]["image"] = str(fixtures / "imgs" / "0.png")
    bad = json.loads(json.dumps(good).replace("0.png", "missing.png"))
    data.write_text("".join(json.dumps(r) + "\n" for r in [good] * 9 + [bad]))
    out = run_generate(str(tiny_model_dir), str(tmp_path / "a.jsonl"), data=str(data), max_new_tokens=2, skip_bad_rows=True)
    assert len(rows_of(out)) == 9
    assert [json.loads(line)["line"] for line in (tmp_path / "a.skipped_rows.jsonl").read_text().splitlines()] == [10]


def test_clips_are_answered_and_stay_valid_from_the_output(tmp_path, tiny_model_dir, video_data_dir):
    """Rows with a clip as a file, as a frame directory and as a list of frames in a Qwen part, answered into another
    directory: the output loads with the same frames."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(video_data_dir, data)
    row = next(json.loads(line) for line in (data / "test_frames.jsonl").read_text().splitlines() if "video" in json.loads(line))
    frames = sorted(p.relative_to(data).as_posix() for p in (data / row["video"]).glob("*.png"))
    qwen = {"messages": [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": row["prompt"]}]}]}
    (data / "qwen.jsonl").write_text(json.dumps(qwen) + "\n")
    for name in ("test.jsonl", "test_frames.jsonl", "qwen.jsonl"):
        out = tmp_path / "elsewhere" / f"{name}.out.jsonl"
        run_generate(str(tiny_model_dir), str(out), data=str(data / name), max_new_tokens=2)
        before, after = load_samples(data / name), load_samples(out)
        assert len(before) == len(after) and any(s["videos"] for s in after), name
        for a, b in zip(before, after):
            assert [v.frames.tolist() for v in a["videos"]] == [v.frames.tolist() for v in b["videos"]], name
