"""The end of a distributed run: its process group destroyed before the interpreter exits."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn


def end_process_group(wait: bool) -> bool:
    """Destroy the default process group, if a launch set one up (`wait`: after a barrier, for a run that finished on
    every rank; a failed rank leaves at once). Its communication threads are then joined here, not torn down with
    the interpreter, where a rank of a finished 2-rank run was seen to abort (`terminate called without an active
    exception`) and fail the launch. Whether there was one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    return True


def exit_finished_rank() -> NoReturn:
    """Exit status 0 for a rank of a finished distributed run, without the interpreter's own teardown: Python's exit
    handlers run (atexit: loggers, trackers), the streams are flushed, then the process ends. The native libraries'
    threads (gloo's, a video decoder's) are not torn down with the interpreter, where a rank of a finished run still
    aborted now and then after its process group was destroyed (SIGABRT, `terminate called without an active
    exception`, seen under load: the launch reported a failure for a run that had finished and saved)."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
