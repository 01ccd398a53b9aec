"""SIGTERM / SIGINT (what a cluster sends before it preempts a job) as a request to stop between PPO
iterations; a second signal exits at once."""

from __future__ import annotations

import shlex
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """While active, the first SIGTERM/SIGINT sets `signum` (checked by the loop); the next one kills the process."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        for s in STOP_SIGNALS:  # a second signal gets the default action: the process ends at once
            signal.signal(s, signal.SIG_DFL)
        print(
            f"\n{signal.Signals(signum).name} received: finishing this PPO iteration, then writing a checkpoint "
            "(send it again to exit at once, without one)",
            file=sys.stderr,
            flush=True,
        )


def resume_command(checkpoint: str, argv: list[str] | None = None, launcher: str | None = None) -> str:
    """The command line that started this process, with `--resume_from_checkpoint CHECKPOINT` in place.

    `launcher` (e.g. "accelerate launch [your launch flags]") replaces `python` before a script path.
    """
    argv = list(sys.argv if argv is None else argv)
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume_from_checkpoint":
            i += 2
            continue
        if argv[i].startswith("--resume_from_checkpoint="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    program = out[0] if out else "vlm-rl ppo"
    prefix = program if program.startswith("vlm-rl") else f"{launcher or 'python'} {shlex.quote(program)}"
    return " ".join([prefix, *map(shlex.quote, out[1:]), "--resume_from_checkpoint", shlex.quote(checkpoint)])
