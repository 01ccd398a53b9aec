"""Running `vlm-rl` in-process in tests, and what a user error must look like."""

from __future__ import annotations

import pytest

from vlm_rl.cli import main as cli_main


def user_error(capsys, argv: list[str]) -> str:
    """Run `vlm-rl ARGV` in-process; expect exit status 2 and one stderr line without a traceback; return it."""
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("vlm-rl ")]  # library warnings aside
    assert info.value.code == 2 and len(ours) == 1 and "Traceback" not in err, err
    return ours[0]


def stops_early(capsys, argv: list[str]) -> str:
    """Run `vlm-rl ARGV` in-process; expect exit status 2 without a traceback; return the whole of stderr (a data
    check's message lists many lines)."""
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    return err
