"""What PPO does with each field it inherits from transformers' `TrainingArguments`: honoured (and how), harmless (and
why), or refused with what to use instead. PPO runs its own loop, so a field that configures transformers' training
or evaluation loop would otherwise be silently ignored; `PPOConfig` refuses those when they differ from their
default, and `vlm-rl ppo --help` leaves them out. A transformers release that adds a field fails
`tests/training/test_inherited_fields.py` until it is placed here."""

from __future__ import annotations

HONOURED = {
    "output_dir": "the run's directory: checkpoints, the final model, ppo_config.yaml, TensorBoard logs",
    "per_device_train_batch_size": "the micro-batch of the training forwards (README: batch arithmetic)",
    "gradient_accumulation_steps": "micro-batches per mini-batch (one optimiser step per mini-batch)",
    "num_train_epochs": "passes over the prompts, when neither total_episodes nor max_steps is given",
    "max_steps": "PPO iterations in all (overrides num_train_epochs; not with total_episodes)",
    "learning_rate": "the policy's learning rate (critic_learning_rate: the critic's)",
    "lr_scheduler_type": "transformers' scheduler",
    "lr_scheduler_kwargs": "transformers' scheduler",
    "warmup_steps": "transformers' scheduler",
    "optim": "transformers' optimizer, in a policy and a critic parameter group",
    "optim_args": "transformers' optimizer",
    "weight_decay": "transformers' optimizer (its weight-decay groups)",
    "adam_beta1": "transformers' optimizer",
    "adam_beta2": "transformers' optimizer",
    "adam_epsilon": "transformers' optimizer",
    "max_grad_norm": "one clip per optimiser step",
    "bf16": "bf16 autocast with fp32 master weights (README: mixed precision)",
    "fp16": "accelerate's fp16 mixed precision",
    "tf32": "set on the CUDA backend by TrainingArguments",
    "activation_checkpointing": "the policy's",
    "activation_checkpointing_kwargs": "the policy's",
    "gradient_checkpointing": "transformers' deprecated name of activation_checkpointing",
    "gradient_checkpointing_kwargs": "the policy's, and TRL's unwrapping for generate",
    "logging_steps": "log every N iterations",
    "log_level": "transformers' log level on the main process",
    "log_level_replica": "transformers' log level on the other processes (default here: error, so a warning shows once)",
    "log_on_each_node": "transformers' log levels per node",
    "disable_tqdm": "the progress bar and every library bar (default here: off when stdout and stderr are terminals)",
    "report_to": "the logging integrations (default here: tensorboard)",
    "run_name": "the logging integrations",
    "project": "the logging integrations",
    "trackio_space_id": "trackio",
    "trackio_bucket_id": "trackio",
    "trackio_static_space_id": "trackio",
    "eval_steps": "evaluate on eval_data every N iterations (PPO's evaluation, not transformers')",
    "save_steps": "a checkpoint every N iterations (0: only at the end)",
    "save_total_limit": "checkpoint rotation",
    "seed": "weights initialised fresh, the prompt order, each process's sampling stream",
    "full_determinism": "transformers' deterministic mode, set up by the Trainer",
    "use_cpu": "accelerate's device",
    "ddp_find_unused_parameters": "DDP (default here: only where the vision tower trains)",
    "ddp_bucket_cap_mb": "DDP",
    "ddp_broadcast_buffers": "DDP",
    "ddp_static_graph": "DDP",
    "ddp_backend": "the process group",
    "ddp_timeout": "the process group",
    "fsdp": "FSDP2 (README: scaling)",
    "fsdp_config": "FSDP2",
    "deepspeed": "DeepSpeed ZeRO (README: scaling)",
    "resume_from_checkpoint": "a checkpoint-N path, or true/latest for the newest complete one",
}

HARMLESS = {
    "accelerator_config": "accelerate's DataLoader options; PPO reads its prompts without one",
    "use_cache": "PPO's forwards never cache; generate always does",
    "logging_nan_inf_filter": "a non-finite step is skipped and counted (train/skipped_steps), never logged as a loss",
    "do_train": "read by scripts, not by the Trainer",
    "do_eval": "read by scripts, not by the Trainer",
    "do_predict": "read by scripts, not by the Trainer",
    "local_rank": "set by the launcher",
}

_OWN_EVALUATION = "PPO evaluates on --eval_data every --eval_steps iterations (--eval_num_samples prompts), not in transformers' loop"
_NO_DATALOADER = "PPO reads its prompts without a DataLoader"
_NO_HUB = "vlm-rl runs offline: upload output_dir after the run (`hf upload`)"
_NOT_IN_THE_LOOP = "transformers' training loop applies it, and PPO runs its own"

REFUSED = {
    "optim_target_modules": "the GaLore/APOLLO optimizers are not supported with PPO's policy and critic parameter groups; choose another --optim",
    "average_tokens_across_devices": "PPO always takes the loss's token mean over every process",
    "label_smoothing_factor": "PPO's loss is the clipped policy loss; there are no labels to smooth",
    "bf16_full_eval": _OWN_EVALUATION + ", in the training precision",
    "fp16_full_eval": _OWN_EVALUATION + ", in the training precision",
    "torch_compile": _NOT_IN_THE_LOOP,
    "torch_compile_backend": _NOT_IN_THE_LOOP,
    "torch_compile_mode": _NOT_IN_THE_LOOP,
    "use_liger_kernel": "PPO computes its logprobs itself, at the response positions only",
    "liger_kernel_config": "PPO computes its logprobs itself, at the response positions only",
    "neftune_noise_alpha": "NEFTune is for supervised fine-tuning (vlm-rl sft)",
    "torch_empty_cache_steps": _NOT_IN_THE_LOOP,
    "auto_find_batch_size": "set per_device_train_batch_size and gradient_accumulation_steps (README: batch arithmetic)",
    "logging_strategy": "PPO logs every --logging_steps iterations",
    "logging_first_step": "PPO logs every --logging_steps iterations (--logging_steps 1 logs the first)",
    "include_num_input_tokens_seen": "val/response_length logs the responses' lengths",
    "eval_strategy": _OWN_EVALUATION,
    "eval_delay": _OWN_EVALUATION,
    "per_device_eval_batch_size": _OWN_EVALUATION + ", in batches of --local_rollout_forward_batch_size",
    "prediction_loss_only": _OWN_EVALUATION,
    "eval_on_start": _OWN_EVALUATION,
    "eval_do_concat_batches": _OWN_EVALUATION,
    "eval_use_gather_object": _OWN_EVALUATION,
    "eval_accumulation_steps": _OWN_EVALUATION,
    "include_for_metrics": _OWN_EVALUATION,
    "batch_eval_metrics": _OWN_EVALUATION,
    "save_only_model": "a PPO checkpoint always holds what resuming needs (weights, optimizer, scheduler, RNG)",
    "save_strategy": "PPO saves a checkpoint every --save_steps iterations (0: only at the end)",
    "save_on_each_node": "the main process writes the checkpoints (output_dir on a shared file system)",
    "enable_jit_checkpoint": "PPO already writes a checkpoint on SIGTERM/SIGINT (README: preemption)",
    "push_to_hub": _NO_HUB,
    "hub_token": _NO_HUB,
    "hub_private_repo": _NO_HUB,
    "hub_model_id": _NO_HUB,
    "hub_strategy": _NO_HUB,
    "hub_always_push": _NO_HUB,
    "hub_revision": _NO_HUB,
    "load_best_model_at_end": "PPO keeps the last weights; compare checkpoints with `vlm-rl compare`",
    "metric_for_best_model": "PPO keeps the last weights; compare checkpoints with `vlm-rl compare`",
    "greater_is_better": "PPO keeps the last weights; compare checkpoints with `vlm-rl compare`",
    "ignore_data_skip": "resuming replays PPO's prompt order exactly: nothing is skipped",
    "restore_callback_states_from_checkpoint": "PPO checkpoints do not hold callback states",
    "data_seed": "the prompt order follows --seed",
    "parallelism_config": "tensor and context parallelism are not supported; use FSDP2 or DeepSpeed (README: scaling)",
    "dataloader_drop_last": _NO_DATALOADER,
    "dataloader_num_workers": _NO_DATALOADER,
    "dataloader_pin_memory": _NO_DATALOADER,
    "dataloader_persistent_workers": _NO_DATALOADER,
    "dataloader_prefetch_factor": _NO_DATALOADER,
    "dataloader_multiprocessing_context": _NO_DATALOADER,
    "dataloader_in_order": _NO_DATALOADER,
    "remove_unused_columns": "PPO hands every dataset column to the rewards",
    "label_names": "PPO has no labels",
    "train_sampling_strategy": "PPO shuffles the prompts once per epoch, with --seed",
    "length_column_name": "PPO shuffles the prompts once per epoch, with --seed",
    "debug": _NOT_IN_THE_LOOP,
    "skip_memory_metrics": _NOT_IN_THE_LOOP,
}


def refusal(name: str, value, default) -> str | None:
    """The message refusing field `name` set to `value` (its TrainingArguments default: `default`), or None."""
    if name not in REFUSED or _same(value, default):
        return None
    return f"{name}={value!r}: PPO does not use it ({REFUSED[name]}); leave {name} unset"


def _same(value, default) -> bool:
    """`value` equals the default: enums by their string value (`IntervalStrategy.NO` == "no"), and every spelling of
    "off" (None, False, "", "no", []) as one."""
    plain = lambda v: getattr(v, "value", v)  # noqa: E731
    off = lambda v: any(plain(v) is x or plain(v) == x for x in (None, False, "", "no", []))  # noqa: E731
    return plain(value) == plain(default) or (off(value) and off(default))
