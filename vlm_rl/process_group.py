"""The end of a distributed run: its process group destroyed before the interpreter exits."""

from __future__ import annotations


def end_process_group(wait: bool) -> None:
    """Destroy the default process group, if a launch set one up (`wait`: after a barrier, for a run that finished on
    every rank; a failed rank leaves at once). Its communication threads are then joined here, not torn down with
    the interpreter, where a rank of a finished 2-rank run was seen to abort (`terminate called without an active
    exception`) and fail the launch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
