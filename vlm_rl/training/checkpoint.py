"""Checkpoints you can trust: written whole or ignored, with a manifest, one RNG state per rank, and a
check of what a resumed run changed.

A checkpoint is built in `output_dir/.checkpoint-N.staging/` (every rank writes its own
`rng_state_{rank}.pth` there, rank 0 the rest), then `manifest.json` (every file with its size, and the
sha256 of files under 1 MiB) is written last and the directory is renamed to `checkpoint-N`. A
`checkpoint-N` without a manifest, or whose files do not match it, is incomplete: `latest` skips it
and naming it explicitly is an error that says which file is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from vlm_rl.errors import UserError

MANIFEST = "manifest.json"
CHECKSUM_BELOW = 1 << 20  # bytes: files smaller than this get a sha256 in the manifest
PREFIX = "checkpoint-"
logger = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, or incompatible with the run resuming from it."""


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).name[len(PREFIX) :])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` directories of `output_dir`, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=checkpoint_step)


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f".{PREFIX}{step}.staging"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, **info) -> None:
    """Record every file under `directory` (size; sha256 of small ones) in `manifest.json`, written last."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        entry = {"size": size}
        if size < CHECKSUM_BELOW:
            entry["sha256"] = sha256(path)
        files[str(path.relative_to(directory))] = entry
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({**info, "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def read_manifest(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / MANIFEST).read_text())


def problem_with(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` cannot be resumed from (the first missing or damaged file), or None if it is complete."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MANIFEST).is_file():
        return f"no {MANIFEST} (it is written last, so the save was interrupted)"
    for name, entry in read_manifest(checkpoint)["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def resolve_checkpoint(resume: str | bool | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: None for none, the newest complete one of output_dir for
    `true`/`latest` (the newer incomplete ones skipped with a warning), or a path, which must be complete."""
    if resume in (None, False, "", "False", "false"):
        return None
    out = Path(output_dir)
    if resume in (True, "True", "true", "latest"):
        found, skipped = latest_complete(out)
        for path, problem in skipped:
            logger.warning(f"skipping incomplete checkpoint {path}: {problem}")
        if found is None:
            why = "".join(f"; {p.name}: {problem}" for p, problem in skipped)
            raise CheckpointError(f"--resume_from_checkpoint {resume}: {out} has no complete checkpoint-N{why}")
        logger.info(f"resuming from {found}")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path}: not found")
    problem = problem_with(path)
    if problem is not None:
        raise CheckpointError(f"{path} is incomplete: {problem}. Resume from an earlier checkpoint, or with 'latest'")
    return path


def latest_complete(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of `output_dir` (or None), and the newer incomplete ones skipped, with why."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        problem = problem_with(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def publish(staging: Path, final: Path) -> None:
    """Rename the finished `staging` directory to `final`; a leftover `final` (incomplete) is set aside first."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staging, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def rng_file(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"rng_state_{rank}.pth"


def save_rng_state(directory: str | os.PathLike, rank: int) -> None:
    """This process's Python, NumPy, torch (and CUDA) generator states, as `rng_state_{rank}.pth`."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()
    torch.save(state, rng_file(directory, rank))


def load_rng_state(directory: str | os.PathLike, rank: int) -> None:
    path = rng_file(directory, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: this checkpoint was written by fewer processes than resume it")
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(state["cuda"])


# What a resumed run may change: hyper-parameters that can change take the new value (with a warning);
# the batch geometry, the models and the data cannot (an error naming the field); the rest is bookkeeping.
FIXED_ON_RESUME = (
    "model_name_or_path", "ref_model_name_or_path", "value_model_name_or_path", "train_data", "train_split", "column_map",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_processes", "seed",
    "use_peft", "lora_r", "lora_alpha", "lora_target_modules", "freeze_vision_tower", "bf16", "fp16",
    "bf16_weights", "max_prompt_length", "skip_long_prompts", "min_pixels", "max_pixels", "advantage_estimator",
    "num_generations", "critic",
)
IGNORED_ON_RESUME = (
    "output_dir", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "disable_tqdm",
    "torch_num_threads", "report_to", "run_name", "local_rank",
)


def plain(config: dict) -> dict:
    """`config` as it reads back from YAML/JSON (tuples as lists, enums and paths as strings)."""
    return json.loads(json.dumps(config, default=str))


def resume_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(errors, warnings): one line per field whose value differs between the checkpoint's run and this one."""
    saved, current = plain(saved), plain(current)
    errors, warnings = [], []
    for name in sorted(set(saved) | set(current)):
        if name in IGNORED_ON_RESUME or saved.get(name) == current.get(name):
            continue
        line = f"{name}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now"
        (errors if name in FIXED_ON_RESUME else warnings).append(line)
    return errors, warnings
