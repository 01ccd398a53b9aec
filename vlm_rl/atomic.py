"""Atomic writes: a file or directory appears whole (temp + rename in the same directory) or not at all.

A directory write never destroys what it did not write: `atomic_dir` refuses a non-empty directory unless told
to overwrite, and then swaps by renames (new content in, old content aside, old removed last), so at every
moment the old or the new content exists whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlm_rl.errors import UserError


class OutputExistsError(UserError):
    """An output path already holds something this command did not write (and no overwrite was asked for)."""


def refuse_existing_output(out_dir: str | os.PathLike, flag: str = "--overwrite", also: str = "") -> None:
    """OutputExistsError when `out_dir` is a file or a non-empty directory; a missing or empty one is fine.
    The message suggests `flag` (and `also`, another way out, e.g. resuming)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        entries = sorted(p.name for p in out_dir.iterdir())
        if not entries:
            return
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise OutputExistsError(
            f"{out_dir} is not empty ({shown}); nothing in it was replaced. "
            f"Pass {flag} to replace its whole content{also}, or give another directory."
        )
    if out_dir.exists() or out_dir.is_symlink():
        raise OutputExistsError(f"{out_dir} exists and is not a directory. Pass {flag} to replace it, or give another path.")


def move_aside(path: str | os.PathLike) -> Path:
    """Rename `path` to a hidden `.NAME.old-XXXX` beside it (same filesystem, so one atomic rename); return it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))  # an empty placeholder
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.old-", dir=path.parent)
        os.close(fd)
        aside = Path(name)
    os.replace(path, aside)  # rename(2) replaces an empty directory with a directory, a file with a file
    return aside


def remove(path: Path) -> None:
    """Delete a file or a directory tree (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _share(tmp: Path) -> None:
    """Some writers (mkstemp-based) leave 0600 files; outputs are meant to be shared."""
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `out_dir`; on success it becomes `out_dir`, on error it is removed.

    Without `overwrite`, a non-empty `out_dir` is refused (before the block runs and again before the swap).
    With it, the old `out_dir` is renamed aside, the new one renamed in, and only then the old one removed;
    if the swap fails, the old one is put back.
    """
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_existing_output(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        _share(tmp)
        if not overwrite:
            refuse_existing_output(out_dir)  # something may have appeared while the block ran
        old = move_aside(out_dir) if out_dir.exists() or out_dir.is_symlink() else None
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        remove(old)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Yield an open temp file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_config_yaml(config: dict) -> str:
    """A run's full resolved config as YAML text (values as they read back: tuples as lists, paths and enums as
    strings)."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=True)


def write_run_config(path: str | os.PathLike, config: dict) -> None:
    """`run_config_yaml(config)` written to `path` atomically."""
    with atomic_file(path) as f:
        f.write(run_config_yaml(config))
