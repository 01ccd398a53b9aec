"""`vlm-rl generate`: answers from any checkpoint, as JSONL that `vlm-rl score` reads directly.

    vlm-rl generate --model runs/ppo/checkpoint-50 --data data/test.jsonl --out answers.jsonl
    vlm-rl generate --model runs/sft --image cat.png --prompt "What colour is the cat?"
    vlm-rl generate --model runs/sft --video clip.mp4 --prompt "Which way does the square move?"

The checkpoint may be a full model, a LoRA adapter (merged into its base) or a PPO `checkpoint-N`. Decoding
uses the same explicit generation config as PPO's rollouts. Each input row is written back with every one of
its columns (named as after `--column_map`) plus `response`; in conversational rows the answer turn
(`completion`, the last assistant/gpt turn) holds the new answer too, so that every reader sees it, and an answer
the row had before is kept as `reference_response`. Image and video paths (video files, frame directories, frame
lists), in image/video columns and in message parts, are rewritten to stay valid relative to the output file; images stored inside a table or dataset directory are written
as PNG files beside it. Every row is checked first (`vlm_rl.data.validate`); with `--skip_bad_rows` the bad ones
are left out and named in OUT's `.skipped_rows.jsonl`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlm_rl.atomic import atomic_file
from vlm_rl.data.bad_rows import SKIPPED_ROWS_FILE
from vlm_rl.data.formats import DataError, PromptDataset, normalise_row, read_rows
from vlm_rl.models.families import family_of
from vlm_rl.rollout.generation import eos_token_ids, generate_responses, make_generation_config, pad_token_id
from vlm_rl.rollout.batch import Rollout
from vlm_rl.rollout.multi_turn import MultiTurn, multi_turn_rollout
from vlm_rl.data.prompts import encode_prompts, model_inputs

IMAGE_FIELDS = ("image", "images", "video", "videos")  # columns holding image or video references
CONVERSATION_FIELDS = ("messages", "prompt", "completion")


@torch.no_grad()
def generate_all(model, processor, samples: list[dict], config, batch_size: int, seed: int, desc: str, multi_turn: MultiTurn | None = None) -> list[Rollout]:
    """Rollouts for every batch of `samples`; batch k is sampled with seed `seed + k` whatever the model. With
    `multi_turn` (tools or an environment), each sample's turns (`Rollout.trajectories`)."""
    tok = processor.tokenizer
    rollouts = []
    for k, start in enumerate(tqdm(range(0, len(samples), batch_size), desc=desc, leave=False)):
        batch = samples[start : start + batch_size]
        query = encode_prompts(processor, batch, tools=multi_turn.tools if multi_turn else None)
        torch.manual_seed(seed + k)
        if multi_turn is not None:
            rollouts.append(
                multi_turn_rollout(
                    model, processor, batch, query, multi_turn.make_environment, config, multi_turn.limits, family=family_of(model),
                    eos_ids=eos_token_ids(tok), pad_id=pad_token_id(tok), tools=multi_turn.tools,
                )  # fmt: skip
            )
            continue
        responses = generate_responses(model, model_inputs(query), config)
        sources = [s["_source"] for s in batch]
        rollouts.append(Rollout.from_generation(query, responses, eos_token_ids(tok), pad_token_id(tok), sources, family_of(model)))
    return rollouts


def portable_images(row: dict, base_dir: Path, out: Path, index: int) -> dict:
    """`row` with its image and video references valid from `out`'s directory: relative paths re-based, embedded
    images (PIL or bytes from a table or dataset directory) written as PNG files beside `out`; in the image and video
    columns and in the image and video parts of its messages (Qwen's "image" and "video", a video's list of frames
    included, OpenAI's "image_url")."""
    from PIL import Image

    count = iter(range(1 << 30))

    def portable(ref):
        if isinstance(ref, (list, tuple)):  # several images, or a video's frames
            return [portable(r) for r in ref]
        if isinstance(ref, dict) and ref.get("bytes"):
            import io

            ref = Image.open(io.BytesIO(ref["bytes"]))
        elif isinstance(ref, dict) and ref.get("path"):
            ref = ref["path"]
        if isinstance(ref, str):
            if ref[:7].lower() == "file://":
                ref = ref[7:]
            kept = os.path.isabs(ref) or ref[:5].lower() == "data:" or "://" in ref  # absolute, inline, or a URL
            return ref if kept else os.path.relpath(base_dir / ref, out.parent)
        if isinstance(ref, Image.Image):
            folder = out.with_name(f"{out.stem}_images")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index}_{next(count)}.png"
            ref.save(path)
            return os.path.relpath(path, out.parent)
        return ref

    def in_part(part):
        if not isinstance(part, dict):
            return part
        part = dict(part)
        for key in ("image", "video", "url", "path"):
            if part.get(key) is not None:
                part[key] = portable(part[key])
        if isinstance(part.get("image_url"), dict) and part["image_url"].get("url") is not None:
            part["image_url"] = {**part["image_url"], "url": portable(part["image_url"]["url"])}
        elif isinstance(part.get("image_url"), str):
            part["image_url"] = portable(part["image_url"])
        return part

    row = dict(row)
    for field in IMAGE_FIELDS:
        if field in row and row[field] is not None:
            row[field] = portable(row[field])
    for field in CONVERSATION_FIELDS:
        if isinstance(row.get(field), list):
            row[field] = [
                {**m, "content": [in_part(p) for p in m["content"]]} if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                for m in row[field]
            ]
    return row


def with_response(row: dict, response: str) -> dict:
    """`row` plus `response`, with the answer also in the place its format keeps one (see the module docstring)."""
    row = copy.deepcopy(row)
    previous = None
    for key, speaker in (("messages", "assistant"), ("conversations", "gpt")):
        turns = row.get(key)
        if isinstance(turns, list):
            role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
            if turns and isinstance(turns[-1], dict) and str(turns[-1].get(role_key, "")).lower() == speaker:
                previous = turns.pop()[text_key]
            turns.append({role_key: speaker, text_key: response})
    if isinstance(row.get("prompt"), list):  # TRL prompt-completion
        previous = row.get("completion", previous)
        row["completion"] = [{"role": "assistant", "content": response}]
    previous = row.get("response", previous)
    if previous is not None:
        row["reference_response"] = previous
    row["response"] = response
    return row


def run_generate(
    model_path: str,
    out: str,
    data: str | None = None,
    image: str | None = None,
    prompt: str | None = None,
    split: str = "test",
    video: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    do_sample: bool = True,
    seed: int = 0,
    column_map: str | None = None,
    skip_bad_rows: bool = False,
    max_bad_row_fraction: float = 0.1,
) -> Path:
    """Answer every row of `data` (or the one `prompt`, with its `image` and/or `video`) with the checkpoint at `model_path`."""
    from vlm_rl.data.bad_rows import write_skipped_rows
    from vlm_rl.data.validate import check_data
    from vlm_rl.models.loading import image_resize, load_base_model, load_processor

    out = Path(out)
    if (data is None) == (prompt is None):
        raise DataError("give either --data FILE or --prompt TEXT (with --image IMAGE or --video VIDEO for a question about one)")
    if data is not None:
        bad = check_data(data, "ppo", split=split, column_map=column_map).rows_to_skip(skip_bad_rows, max_bad_row_fraction)
        input_rows, base_dir = read_rows(data, split, column_map)
        rows = [(row.source, row.fields) for row in input_rows if row.source not in bad.sources]
        write_skipped_rows(out.parent, [bad], name=f"{out.stem}.{SKIPPED_ROWS_FILE}")
    else:
        media = {k: str(Path(v).resolve()) for k, v in (("image", image), ("video", video)) if v}
        single = {"prompt": prompt, **media}
        rows, base_dir = [("--prompt", single)], Path.cwd()
    rows = rows[: max_samples or None]
    processor = load_processor(model_path)
    resize = image_resize(model_path, processor)
    samples = list(PromptDataset([normalise_row(row, where) for where, row in rows], base_dir, resize))  # images opened
    model = load_base_model(model_path, torch.float32).eval()
    config = make_generation_config(processor.tokenizer, max_new_tokens, temperature=temperature, do_sample=do_sample)
    responses = []
    for rollout in generate_all(model, processor, samples, config, batch_size, seed, desc="generate"):
        responses += processor.batch_decode(rollout.responses, skip_special_tokens=True)
    with atomic_file(out) as f:
        for i, ((_, row), response) in enumerate(zip(rows, responses, strict=True)):
            f.write(json.dumps(with_response(portable_images(row, base_dir, out, i), response), ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-rl generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a full model, a LoRA adapter, or a PPO checkpoint-N directory")
    parser.add_argument("--data", help="prompts in any supported format (see the README)")
    parser.add_argument("--image", help="with --prompt: one image to ask about")
    parser.add_argument("--video", help="with --prompt: one video (a file, or a directory of frames) to ask about")
    parser.add_argument("--prompt", help="one question instead of --data")
    parser.add_argument("--out", default=None, help="output JSONL (default: print the answer(s))")
    parser.add_argument("--split", default="test", help="split of a dataset directory")
    parser.add_argument("--column_map", "--column-map", default=None, help="rename columns first: SOURCE=TARGET,... (e.g. question=prompt,img=image)")
    parser.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true", help="skip rows that fail the data check (named in OUT's .skipped_rows.jsonl)")
    parser.add_argument("--max_bad_row_fraction", "--max-bad-row-fraction", type=float, default=0.1, help="with --skip_bad_rows: stop when more rows are bad")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.image or args.video) and not args.prompt:
        parser.error("--image and --video need --prompt")
    if args.out is None and args.data is not None:
        parser.error("--data needs --out")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vlm-rl-generate-")) / "answer.jsonl"
    path = run_generate(
        args.model, str(out), data=args.data, image=args.image, prompt=args.prompt, split=args.split, video=args.video,
        max_samples=args.max_samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, do_sample=not args.greedy, seed=args.seed, column_map=args.column_map,
        skip_bad_rows=args.skip_bad_rows, max_bad_row_fraction=args.max_bad_row_fraction,
    )  # fmt: skip
    if args.out is None:
        print(json.loads(path.read_text())["response"])
        shutil.rmtree(path.parent)
    else:
        print(f"{len(path.read_text().splitlines())} answers written to {path}")


if __name__ == "__main__":
    from vlm_rl.errors import run_command

    run_command("generate", main, sys.argv[1:])
