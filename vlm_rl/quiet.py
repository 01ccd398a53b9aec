"""Console noise a user cannot act on, silenced where it arises: library warnings (on import of vlm_rl), progress bars
where no terminal shows them, and every warning but the main process's.

Each warning filter is narrow (the message, and the category or logger) and says why the warning is noise. Warnings
a user can act on (their own deprecated flags, a biased KL estimator, unscored batches) stay, once per run.
"""

from __future__ import annotations

import logging
import sys
import warnings


def not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's notice that it found no GPU. DeepSpeed, merely installed, is imported by accelerate on
    every model save or unwrap, and logs it on every run on a machine without a GPU, where there is none to find."""
    return not record.getMessage().startswith("Setting accelerator to CPU.")


def not_accumulation_mismatch(record: logging.LogRecord) -> bool:
    """False for accelerate's "Gradient accumulation steps mismatch" under DeepSpeed. transformers' Trainer gives
    accelerate 1 accumulation step (it accumulates itself), and PPO gives DeepSpeed its own count, so that the engine
    steps at the mini-batch's end (models/sharding.py configure_deepspeed): the mismatch is by design, and the value
    accelerate then takes, DeepSpeed's, is the right one."""
    return "Gradient accumulation steps mismatch" not in record.getMessage()  # after accelerate's "[RANK n] "


def not_cuda_home_notice(record: logging.LogRecord) -> bool:
    """False for torch's "No CUDA runtime is found, using CUDA_HOME=...", logged when DeepSpeed looks for its ops'
    build tools on a machine without a GPU: a CPU run needs no CUDA runtime."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def silence() -> None:
    """Install the filters (again, where a test harness has reset the warning filters since the import)."""
    # transformers 5.23 renamed `is_gradient_checkpointing`; peft (wrapping a LoRA model) and TRL
    # (unwrap_model_for_generation) still read the old name. Nothing in a user's flags or code reads it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # DeepSpeed's ZeRO gathers its partitions with torch.distributed.all_gather_into_tensor, which torch 2.14 deprecates.
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated", category=FutureWarning)
    # On the loggers DeepSpeed and accelerate create under these names on first import, keeping their filters.
    logging.getLogger("DeepSpeed").addFilter(not_deepspeed_cpu_notice)
    logging.getLogger("accelerate.accelerator").addFilter(not_accumulation_mismatch)
    logging.getLogger("torch.utils.cpp_extension").addFilter(not_cuda_home_notice)


def on_a_terminal() -> bool:
    """Whether both stdout and stderr are terminals: only then can a progress bar redraw itself without leaving
    fragments in a log file or glued to the lines printed beside it."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def disable_progress_bars() -> None:
    """No progress bar from transformers ("Loading weights", "Writing model shards"), the hub or datasets."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the hub's bars too
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def only_the_main_process_warns(process_index: int) -> None:
    """On every process but the main one (`process_index` > 0), warnings and log records below errors are dropped:
    each process of a run sees the same configuration and the same global decisions, so the main process's
    warning is the run's, printed once instead of once per rank."""
    if process_index == 0:
        return
    warnings.simplefilter("ignore")
    for name in ("vlm_rl", "reward_models", "transformers", "accelerate", "DeepSpeed", "torch", "peft", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


silence()
