"""The one exception type for mistakes in what the user gave us (data, flags, paths, services), and how a
command shows it.

`vlm-rl` prints a `UserError` as one message and exits with status 2, without a traceback (unless
`--debug` or `VLM_RL_DEBUG=1`). Everything else is a bug in vlm-rl and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "VLM_RL_DEBUG"


class UserError(Exception):
    """A user error: the message names the file/line/field (or flag, path, URL) and says what to do."""


class ConfigError(UserError, ValueError):
    """A config field (PPOConfig, a reward's training arguments) with a value that makes no sense; the message
    names the field."""


def run_command(command: str, main: Callable[[list[str]], object], argv: Sequence[str]) -> None:
    """Run `main(argv)` as `vlm-rl COMMAND`: a UserError becomes `vlm-rl COMMAND: error: MESSAGE` on stderr and
    exit status 2. `--debug` anywhere in `argv` (removed before `main` sees it) or VLM_RL_DEBUG=1 lets it
    propagate with its traceback. The hub is not asked unless HF_HUB_OFFLINE is set to 0. A distributed run's
    process group is destroyed before the command exits; a finished rank of one exits here (`exit_finished_rank`)."""
    from vlm_rl.process_group import end_process_group, exit_finished_rank

    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time (set HF_HUB_OFFLINE=0 to allow it)
    finished = False
    try:
        main([a for a in argv if a != DEBUG_FLAG])
        finished = True
    except UserError as e:
        if debug:
            raise
        print(f"vlm-rl {command}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        distributed = end_process_group(wait=finished)
    if distributed:  # finished on every rank (a failure raised above)
        exit_finished_rank()
