"""Shared set-up for the benchmarks: the tiny model and synthetic prompts, built into a temp dir."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def tiny_setup(n: int = 64):
    """(model, processor, samples) with the embedded tiny Qwen2-VL and `n` synthetic prompts."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vlm_rl.data import load_samples
    from vlm_rl.synthetic_data import make_synthetic_data
    from vlm_rl.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_tiny_model(root / "model")
    data_dir = make_synthetic_data(root / "data", n=n, test_fraction=0.0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor, list(load_samples(data_dir / "train.jsonl"))


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
