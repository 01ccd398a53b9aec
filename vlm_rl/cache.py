"""Where vlm-rl builds its embedded defaults (the tiny models, the synthetic datasets) on first use."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$VLM_RL_CACHE, else ~/.cache/vlm_rl."""
    return Path(os.environ.get("VLM_RL_CACHE", Path.home() / ".cache" / "vlm_rl"))
