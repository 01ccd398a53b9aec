"""Launched by tests/test_ppo_entrypoint.py under `accelerate launch`: trains briefly, then each rank records
what it saw (its first prompts), what it ended with (a parameter checksum), and the advantages and mask of one
more rollout (to check that advantages are whitened over the global batch, not per rank)."""

import json
import sys
from pathlib import Path

import torch
from trl import TrlParser

from vlm_rl.config import PPOConfig
from vlm_rl.ppo import build_trainer

(config,) = TrlParser((PPOConfig,)).parse_args_and_config(args=sys.argv[1:])
torch.set_num_threads(1)
trainer = build_trainer(config)
first_sources = [s["_source"] for s in trainer.batch_samples(0)]
trainer.train()
params = trainer.accelerator.unwrap_model(trainer.model_wrapped).parameters()
checksum = sum(float(p.detach().double().sum()) for p in params)
samples = trainer.batch_samples(0)
rollout = trainer.make_rollout(samples)
scored = trainer.score(rollout, samples)
old = trainer.advantages(rollout, scored)
rank = trainer.accelerator.process_index
out = Path(config.output_dir) / f"rank{rank}.json"
out.write_text(json.dumps({
    "rank": rank, "world": trainer.accelerator.num_processes, "sources": first_sources, "checksum": checksum,
    "num_prompts": len(trainer.train_dataset),
    "advantages": old["advantages"].tolist(), "train_mask": old["train_mask"].tolist(),
}))
