"""What the launcher set up for this process, read from the environment before anything else starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from vlm_rl.quiet import only_the_main_process_warns

RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")  # torchrun/DeepSpeed, MPI
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")


def process_index(environ: Mapping[str, str] = os.environ) -> int:
    """This process's rank among all the run's processes (0 when launched alone)."""
    for name in RANK_VARIABLES:
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return 0


def fewer_processes_than_asked(environ: Mapping[str, str] = os.environ) -> str | None:
    """A warning when `accelerate launch` was asked for several processes and started this one alone, else None.

    accelerate's simple launcher (what `--cpu`, or `--num_processes N` without `--multi_gpu`, runs) starts one
    process whatever `--num_processes` says; when N > 1 it still exports MASTER_ADDR and MASTER_PORT, which no
    single-process launch sets, but no world size, which every multi-process launcher (torchrun, DeepSpeed, MPI) sets.
    """
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ  # every `accelerate launch` exports it
    asked_for_several = "MASTER_ADDR" in environ
    got_several = any(name in environ for name in WORLD_SIZE_VARIABLES)
    if not (launched_by_accelerate and asked_for_several and not got_several):
        return None
    return (
        "accelerate launch was asked for more than one process but started this one alone: its simple launcher (--cpu, "
        "or --num_processes without --multi_gpu) runs one process. For several processes on CPU, launch with "
        "--multi_gpu and `use_cpu: true` in the accelerate config (README: several processes)"
    )


def start_process(command: str) -> None:
    """Before a training command reads its flags: warnings from the main process only (once per run), and a warning
    when the launch started fewer processes than it was asked for."""
    only_the_main_process_warns(process_index())
    warning = fewer_processes_than_asked()
    if warning is not None:
        print(f"vlm-rl {command}: warning: {warning}", file=sys.stderr, flush=True)
