"""atomic_dir never destroys what it did not write: a non-empty target is refused unless overwrite, and an
overwrite swaps by renames, so the old or the new content exists whole at every moment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlm_rl import atomic
from vlm_rl.atomic import OutputExistsError, atomic_dir
from vlm_rl.errors import UserError


def write(dir_: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (dir_ / name).parent.mkdir(parents=True, exist_ok=True)
        (dir_ / name).write_text(text)


def content(dir_: Path) -> dict[str, str]:
    return {str(p.relative_to(dir_)): p.read_text() for p in sorted(dir_.rglob("*")) if p.is_file()}


OLD = {"notes.txt": "my thesis", "sub/data.csv": "1,2,3"}
NEW = {"train.jsonl": "{}\n", "images/0.png": "png"}


def hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_a_non_empty_directory_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "project"
    write(out, OLD)
    ran = []
    with pytest.raises(OutputExistsError) as info:
        with atomic_dir(out) as tmp:
            ran.append(tmp)  # the refusal comes before the (expensive) block runs
    assert isinstance(info.value, UserError)
    assert str(out) in str(info.value) and "--overwrite" in str(info.value) and "notes.txt" in str(info.value)
    assert not ran and content(out) == OLD and not hidden(tmp_path)


def test_a_file_in_the_way_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(OutputExistsError, match="not a directory"):
        with atomic_dir(out):
            pass
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("exists", [False, True])
def test_a_missing_or_empty_directory_is_written(tmp_path, exists):
    out = tmp_path / "a" / "out"
    if exists:
        out.mkdir(parents=True)
    with atomic_dir(out) as tmp:
        write(tmp, NEW)
    assert content(out) == NEW and not hidden(out.parent)


def test_overwrite_replaces_the_whole_content(tmp_path):
    out = tmp_path / "out"
    write(out, OLD)
    with atomic_dir(out, overwrite=True) as tmp:
        write(tmp, NEW)
    assert content(out) == NEW and not hidden(tmp_path)  # no temp or aside directory left behind


def test_overwrite_replaces_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        write(tmp, NEW)
    assert content(out) == NEW and not hidden(tmp_path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_crash_inside_the_block_leaves_the_old_content(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        write(out, OLD)
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write(tmp, {"half.jsonl": "{"})
            raise RuntimeError("writer crashed")
    assert (content(out) == OLD) if overwrite else not out.exists()
    assert not hidden(tmp_path)


def test_something_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with atomic_dir(out) as tmp:
            write(tmp, NEW)
            write(out, OLD)  # another process (or the user) writes there while the block runs
    assert content(out) == OLD and not hidden(tmp_path)


def test_old_or_new_exists_whole_at_every_moment_of_the_swap(tmp_path, monkeypatch):
    """Each rename of the swap is observed: before and after it, the old content (under its name or aside) or
    the new content (under the name) is complete."""
    out = tmp_path / "out"
    write(out, OLD)
    real_replace, seen = os.replace, []

    def whole_somewhere() -> bool:  # under the name: old or new; else the old one aside
        if out.is_dir() and content(out) in (OLD, NEW):
            return True
        return any(content(d) == OLD for d in tmp_path.iterdir() if d.name.startswith(".out.old-"))

    def observed_replace(src, dst):
        assert whole_somewhere()
        real_replace(src, dst)
        seen.append(Path(dst).name)
        assert whole_somewhere()

    monkeypatch.setattr(atomic.os, "replace", observed_replace)
    with atomic_dir(out, overwrite=True) as tmp:
        write(tmp, NEW)
    assert content(out) == NEW and len(seen) == 2  # old aside, then new in


def test_a_failed_rename_in_puts_the_old_content_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(out, OLD)
    real_replace = os.replace

    def failing_rename_in(src, dst):
        if Path(dst) == out and ".old-" not in Path(src).name:  # the new content's rename in
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_rename_in)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out, overwrite=True) as tmp:
            write(tmp, NEW)
    assert content(out) == OLD and not hidden(tmp_path)
