"""Warnings from the libraries under vlm-rl that a user cannot act on, silenced where they arise (on import of vlm_rl).

Each filter is narrow (the message, and the category or logger) and says why the warning is noise. Warnings a
user can act on (their own deprecated flags, a biased KL estimator, unscored batches) stay.
"""

from __future__ import annotations

import logging
import warnings


def not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's notice that it found no GPU. DeepSpeed, merely installed, is imported by accelerate on
    every model save or unwrap, and logs it on every run on a machine without a GPU, where there is none to find."""
    return not record.getMessage().startswith("Setting accelerator to CPU.")


def silence() -> None:
    """Install the filters (again, where a test harness has reset the warning filters since the import)."""
    # transformers 5.23 renamed `is_gradient_checkpointing`; peft (wrapping a LoRA model) and TRL
    # (unwrap_model_for_generation) still read the old name. Nothing in a user's flags or code reads it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # On DeepSpeed's logger, which DeepSpeed creates under this name on first import, keeping its filters.
    logging.getLogger("DeepSpeed").addFilter(not_deepspeed_cpu_notice)


silence()
