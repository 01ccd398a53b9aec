"""PPOTrainer's checkpoints: saved whole (staging directory, manifest last, renamed), loaded in two halves (the
weights into the unprepared model, so the engine shards them as it shards a fresh start; the optimizer, scheduler,
RNG and trainer state after `prepare`), and the final model written into output_dir. The file format, the manifest
and what a resumed run may change are in checkpoint.py."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import TrainerState
from transformers.trainer_utils import rotate_checkpoints

from vlm_rl.models.critic import load_critic_state, save_critic
from vlm_rl.models.sharding import (
    gathered_parameters,
    is_deepspeed,
    load_optimizer,
    load_unsharded,
    save_optimizer,
    submodule_state,
    writable_parameters,
)
from vlm_rl.training import checkpoint as ckpt

logger = logging.getLogger(__name__)
CONFIG_FILE = "ppo_config.yaml"
DEEPSPEED_TAG = "deepspeed"  # checkpoint-N/deepspeed/: the engine's own files (weights and optimizer shards per rank)


class CheckpointingMixin:
    """Saving and loading for PPOTrainer (a transformers Trainer with `model` = PolicyAndValue, `processor`,
    `rng_devices` and `critic_learning_rate`)."""

    def run_config(self) -> dict:
        """This run's full resolved config, as written to `ppo_config.yaml` (plus the number of processes)."""
        return ckpt.plain({**self.args.to_dict(), "num_processes": self.accelerator.num_processes})

    def save_checkpoint(self) -> Path:
        """`output_dir/checkpoint-N/`: the policy (full or adapter), critic, processor, optimizer, scheduler, one RNG
        state per rank, trainer state and config; built in a staging directory, manifest last, renamed."""
        out = Path(self.args.output_dir)
        step = self.state.global_step
        staging, final = ckpt.staging_dir(out, step), out / f"{ckpt.PREFIX}{step}"
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of an interrupted save of this same step
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        ckpt.save_rng_state(staging, self.accelerator.process_index)
        # Whatever saving draws (FSDP2's state-dict gathering does) is drawn from a fork: the run goes on with the
        # streams just saved, as a run resumed from this checkpoint does.
        with torch.random.fork_rng(devices=self.rng_devices):
            if is_deepspeed(self.accelerator):  # ZeRO partitions the optimizer state: the engine saves each rank's shard
                self.model_wrapped.save_checkpoint(str(staging), tag=DEEPSPEED_TAG)
            else:
                save_optimizer(self.model_wrapped, self.optimizer, self.accelerator, staging / "optimizer.pt")
            self.save_model_files(staging)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            torch.save(self.lr_scheduler.state_dict(), staging / "scheduler.pt")
            self.state.save_to_json(str(staging / "trainer_state.json"))
            (staging / CONFIG_FILE).write_text(yaml.safe_dump(self.run_config(), sort_keys=True))
            ckpt.write_manifest(staging, step=step, num_processes=self.accelerator.num_processes)
            ckpt.publish(staging, final)
            rotate_checkpoints(self.args.output_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()
        return final

    def save_model_files(self, directory: Path) -> None:
        """Full Hugging Face weights (gathered from every rank under ZeRO-3 and FSDP2), written by the main process."""
        wrapped = self.accelerator.unwrap_model(self.model_wrapped)
        with gathered_parameters(wrapped, self.accelerator) as full:
            if self.is_world_process_zero():
                policy_state = None if full is None else submodule_state(full, "policy.")
                wrapped.policy.save_pretrained(directory, safe_serialization=True, state_dict=policy_state)
                if wrapped.critic is not None:  # critic-free estimators have none
                    critic_state = None if full is None else submodule_state(full, "critic.")
                    save_critic(wrapped.critic, directory, self.processor, state_dict=critic_state)
                self.processor.save_pretrained(directory)

    def save_final(self, output_dir: str) -> None:
        """The final policy, critic, processor and trainer_state.json in `output_dir` itself (each file atomic)."""
        out = Path(output_dir)
        staging = out / ".final.staging"
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of an interrupted save
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.save_model_files(staging)
        if self.is_world_process_zero():
            self.state.save_to_json(str(staging / "trainer_state.json"))
            for f in staging.iterdir():
                os.replace(f, out / f.name)
            staging.rmdir()
        self.accelerator.wait_for_everyone()

    def load_weights(self, checkpoint: Path) -> None:
        """Restore the policy and critic weights saved by `save_checkpoint` into the unprepared model (the engine
        then shards them as it shards a fresh start), after checking what this run changed: fixed fields are an
        error, the others take their new value."""
        errors, changed = ckpt.resume_changes(yaml.safe_load((checkpoint / CONFIG_FILE).read_text()), self.run_config())
        if errors:
            raise ckpt.CheckpointError(
                f"cannot resume from {checkpoint} with a different " + "; ".join(errors) + ". Start a new run (another "
                "--output_dir) to change these"
            )
        for line in changed:
            logger.warning(f"resuming with a changed {line}: the new value is used")
        policy = self.model.policy
        with writable_parameters(self.model, self.accelerator):
            if isinstance(policy, PeftModel):
                from peft import set_peft_model_state_dict
                from peft.utils import load_peft_weights

                set_peft_model_state_dict(policy, load_peft_weights(str(checkpoint), device="cpu"))
            else:  # from_pretrained applies the checkpoint's key mapping (v5 saves the hub layout)
                saved = load_unsharded(type(policy), checkpoint, policy.dtype)
                policy.load_state_dict(saved.state_dict())
                del saved
            if self.model.critic is not None:
                load_critic_state(self.model.critic, policy, checkpoint)

    def load_training_state(self, checkpoint: Path) -> None:
        """Restore the optimizer, scheduler, RNG and trainer state saved by `save_checkpoint` (after `prepare`)."""
        if is_deepspeed(self.accelerator):
            self.model_wrapped.load_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            load_optimizer(self.model_wrapped, self.optimizer, self.accelerator, checkpoint / "optimizer.pt")
        self.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        self.retarget_learning_rate()
        saved = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        self.state.global_step = saved.global_step
        self.state.epoch = saved.epoch
        self.state.log_history = saved.log_history
        ckpt.load_rng_state(checkpoint, self.accelerator.process_index)

    def retarget_learning_rate(self) -> None:
        """After loading a scheduler: continue its schedule from this run's learning_rate (a changed one takes effect)."""
        scheduler = self.lr_scheduler
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is None:
            return
        for i, (group, lr_lambda) in enumerate(zip(self.optimizer.param_groups, lambdas)):
            scheduler.base_lrs[i] = group["initial_lr"] = self.critic_learning_rate if group.get("critic") else self.args.learning_rate
            group["lr"] = group["initial_lr"] * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
