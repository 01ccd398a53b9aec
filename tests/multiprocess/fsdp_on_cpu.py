"""`scripts/ppo.py` with accelerate's FSDP allowed on CPU ranks (tests only). accelerate turns FSDP on for GPU-like
devices only; this lets `accelerate launch --config_file configs/accelerate/fsdp2.yaml` run the same trainer code
a GPU run takes (accelerate's fully_shard preparation, FSDP2 checkpoints) on 2 gloo CPU ranks."""

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_allowing_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP  # what accelerate does on GPUs (state.py)
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_allowing_fsdp_on_cpu

if __name__ == "__main__":
    from vlm_rl.errors import run_command
    from vlm_rl.ppo import main

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with --config_file configs/accelerate/fsdp2.yaml"
    run_command("ppo", main, sys.argv[1:])
