"""The value head (a scalar per token from a backbone's hidden states) and its save/load; `vlm_rl.models.critic` places it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """A scalar per token from the backbone's hidden state, in fp32 even under bf16 autocast. Starts at V = 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        # In the head's own dtype: fp32, unless an engine cast the whole model (DeepSpeed's bf16 mode does); values out in fp32.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.summary(hidden.to(self.summary.weight.dtype)).float().squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return getattr(config, "text_config", config).hidden_size


def save_value_head(value_head: ValueHead, directory: str | os.PathLike) -> Path:
    """Write `value_head.safetensors` into `directory` (atomically)."""
    path = Path(directory) / VALUE_HEAD_FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_value_head(directory: str | os.PathLike, hidden_size: int) -> ValueHead:
    """The value head saved beside a policy; a clear error when it is missing or of another size."""
    path = Path(directory) / VALUE_HEAD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no value head (start one with a fresh head instead)")
    head = ValueHead(hidden_size)
    state = load_file(str(path))
    if state["summary.weight"].shape != head.summary.weight.shape:
        raise ValueError(f"{path}: value head is for hidden size {state['summary.weight'].shape[1]}, the policy has {hidden_size}")
    head.load_state_dict(state)
    return head
