"""A PPO run's output directory: an earlier run in it is refused, or set aside and removed once the new run ends;
nothing the run did not write is touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

from accelerate import Accelerator

from vlm_rl.errors import UserError
from vlm_rl.training.checkpoint import list_checkpoints


def previous_run(output_dir: str | os.PathLike) -> list[Path]:
    """What an earlier PPO run left in `output_dir` (its checkpoints and trainer_state.json), oldest first."""
    out = Path(output_dir)
    return list_checkpoints(out) + [p for p in (out / "trainer_state.json",) if p.exists()]


def refuse_previous_run(output_dir: str | os.PathLike) -> None:
    """A UserError if `output_dir` holds an earlier run (for a run that neither resumes nor overwrites it)."""
    previous = previous_run(output_dir)
    if previous:
        raise UserError(
            f"{output_dir} already holds a PPO run ({', '.join(p.name for p in previous)}): pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another --output_dir"
        )


def claim_output_dir(output_dir: str | os.PathLike, overwrite: bool, accelerator: Accelerator) -> Path | None:
    """Refuse an `output_dir` holding an earlier run unless `overwrite`; then move that run aside (into a hidden
    directory that the caller removes when the new run finishes) and return where it went (None: nothing to move)."""
    out = Path(output_dir)
    previous = previous_run(out)
    if not previous:
        return None
    if not overwrite:
        refuse_previous_run(out)
    aside = out / f".replaced-{int(time.time())}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        aside.mkdir()
        for p in previous:
            os.replace(p, aside / p.name)
    accelerator.wait_for_everyone()
    return aside
