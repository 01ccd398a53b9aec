"""Shared fixtures: the tiny Qwen2-VL and the synthetic dataset, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # parallel workers: each builds the embedded defaults into its own cache
    os.environ["VLM_RL_CACHE"] = os.path.join(os.environ.get("VLM_RL_CACHE", os.path.expanduser("~/.cache/vlm_rl")), os.environ["PYTEST_XDIST_WORKER"])
# One intra-op thread: tiny-model matmuls are 100x slower with 2 threads on small VMs (benchmarks/cpu_threads.py).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlm_rl.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl", seed=0)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_model_dir):
    """Each family's tiny model, built once per session (Qwen2-VL's is `tiny_model_dir`): `family_dirs(name)`."""
    from vlm_rl.models.tiny import make_tiny_model

    built = {"qwen2_vl": tiny_model_dir}

    def get(name):
        if name not in built:
            built[name] = make_tiny_model(tmp_path_factory.mktemp("models") / f"tiny-{name}", seed=0, family=name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def video_data_dir(tmp_path_factory) -> Path:
    """A few rows of every video task and of colour questions (images): clips (mp4 + frame folders) and scenes."""
    from vlm_rl.data.synthetic import make_synthetic_data

    return make_synthetic_data(tmp_path_factory.mktemp("data") / "clips", n=16, seed=0, tasks=["motion", "appear", "colour"], noise=0.3)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    from vlm_rl.data.synthetic import make_synthetic_data

    return make_synthetic_data(tmp_path_factory.mktemp("data") / "shapes", n=40, seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A fresh copy per test: tests may train it."""
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
