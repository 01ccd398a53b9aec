"""`vlm-rl train-reward`: train a Qwen2-VL reward model (Bradley-Terry) on image + prompt + chosen/rejected pairs.

    vlm-rl train-reward --config configs/reward_tiny.yaml
    accelerate launch -m reward_models.train_reward --model_name_or_path runs/sft --train_data prefs.jsonl ...

Data: any format `vlm_rl.data.load_samples` reads, with a `chosen` and a `rejected` column (strings, or TRL
conversational completions: lists of assistant messages), e.g. the synthetic set's
`{"image", "prompt", "chosen", "rejected"}` rows. `--train_data synthetic` is the embedded shapes set's
`preferences.jsonl` (`--eval_data synthetic`: its `preferences_test.jsonl`); without `--eval_data` a seeded
`--eval_fraction` of the training pairs is held out.

Loss: `-logsigmoid(r_chosen - r_rejected)` (+ `center_rewards_coefficient * mean((r_chosen + r_rejected)^2)` if
set, as in TRL's RewardTrainer); chosen and rejected go through one batched forward. Held-out pairwise accuracy
(`r_chosen > r_rejected`, ties count as wrong) is reported after every epoch and at the end. The output directory
(written atomically) is a `VLMRewardModel` directory plus `eval_results.json` (with a `log_history` of the loss
and learning rate every `--logging_steps` optimiser steps) and `train_reward_config.yaml` (the full resolved
config). A non-empty output directory is refused before anything loads unless `--overwrite`, which replaces it
whole; every data row is checked (`vlm_rl.data.validate`) before the model loads.

Multi-process training goes through `accelerate` (`Accelerator`, `prepare`, `backward`, `gather_for_metrics`);
train loss/accuracy are reduced over processes, eval metrics gathered without the padding duplicates. The LR
schedule runs over the optimiser steps and is stepped once per step, so it is the same on any number of
processes (and with any gradient accumulation) for the same global batch.

The embedded tiny model (configs/reward_tiny.yaml) runs this pipeline in about 40 s on 2 CPU cores, but its
held-out accuracy stays at chance: the randomly initialised tiny Qwen2-VL (hidden 64, initializer_range 0.02)
does not learn to read the image from 320 pairs. Measured: at initialisation, swapping the image changes the
response-dependence of the scored hidden state by 0.2% of its norm, so the image x response interaction a
reward needs has almost no gradient; the loss sits at ln 2 even with 10x more pairs (1100 steps), and SFT of the
same model on 3200 rows stays at the per-question answer prior. A backbone that already grounds images
(Qwen2-VL-2B, or an SFT checkpoint that does) is what the recipe needs. Re-initialised with fan-in scaled weights,
the same tiny architecture does learn (0.70 held-out, lr 1e-4, batch 4, 30 epochs): the blocker is the init scale.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from reward_models.base import completion_text
from vlm_rl.atomic import refuse_existing_output, run_config_yaml
from vlm_rl.data.bad_rows import SKIPPED_ROWS_FILE, announce_skipped, skipped_rows_jsonl
from vlm_rl.data.options import DataOptions
from vlm_rl.errors import ConfigError
from vlm_rl.data.formats import DataError
from vlm_rl.models.dummy_image import expect_videos
from vlm_rl.models.families import Family, family_of, join_images
from vlm_rl.models.loading import image_resize, require_model

TRAIN_CONFIG_FILE = "train_reward_config.yaml"


@dataclass
class RewardTrainingConfig(DataOptions):
    """Every knob of a reward-model run (YAML via --config, or CLI flags; names follow TrainingArguments), and the
    data options of `DataOptions`."""

    model_name_or_path: str = field(
        default="tiny", metadata={"help": "Backbone to start from: a Qwen2-VL directory, a peft adapter directory, or 'tiny'."}
    )
    train_data: str = field(
        default="synthetic",
        metadata={"help": "Preference pairs (.jsonl/.json/dataset dir with chosen/rejected columns), or 'synthetic'."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out pairs; 'synthetic' = the embedded set's preferences_test; default: --eval_fraction of train."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to read when train_data is a dataset directory."})
    eval_split: str = field(default="test", metadata={"help": "Split to read when eval_data is a dataset directory."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of train held out for evaluation when --eval_data is not given."})
    output_dir: str = field(default="runs/reward-model", metadata={"help": "Where the reward model and eval_results.json go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a non-empty output_dir whole (default: refuse it, before anything loads).", "aliases": ["--overwrite"]},
    )
    name: str = field(default="vlm_rm", metadata={"help": "The reward's name (metric and score column names)."})

    learning_rate: float = field(default=1e-4)
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name: linear, cosine, constant, ..."})
    warmup_ratio: float = field(default=0.0)
    max_grad_norm: float = field(default=1.0)
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps in all; > 0 overrides num_train_epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per micro-batch (2x sequences per forward)."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Pairs per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1)
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "Weight of mean((r_chosen + r_rejected)^2), keeping rewards centred on 0 (TRL's RewardConfig)."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Longer sequences (image tokens included) are an error, never cut."})
    padding_side: str = field(default="right", metadata={"help": "Padding of the reward model's batches (right or left)."})
    min_pixels: int | None = field(default=None, metadata={"help": "Override the processor's min_pixels."})
    max_pixels: int | None = field(default=None, metadata={"help": "Override the processor's max_pixels."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Full fine-tuning only: keep the vision encoder frozen."})
    gradient_checkpointing: bool = field(default=False)
    cache_encodings: bool = field(
        default=False, metadata={"help": "Run the processor once per pair and keep the tensors in memory (small data sets: faster epochs)."}
    )

    use_peft: bool = field(default=False, metadata={"help": "LoRA on the language model (saved merged); the head is trained in full."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Language-model modules LoRA adapts (default: the model family's, vlm_rl.models.families)."}
    )

    seed: int = field(default=0)
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even where a GPU exists."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (accelerate autocast; weights stay fp32)."})
    dataloader_num_workers: int = field(default=0)
    logging_steps: int = field(
        default=0,
        metadata={"help": "Log the training loss and learning rate every N optimiser steps (0: per epoch only)."},
    )
    eval_each_epoch: bool = field(default=True, metadata={"help": "Evaluate after every epoch (always at the end)."})
    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU intra-op threads. 1 is fastest for tiny models: on small VMs thread wake-ups cost more than the matmuls."},
    )

    def __post_init__(self):
        self.check_data_options()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("give num_train_epochs > 0 or max_steps > 0")


# ------------------------------------------------------------------------------------------ data


def load_pairs(path: str, split: str, config: RewardTrainingConfig | None = None):
    """(preference pairs in the normal form, the bad rows skipped), every row checked first (`vlm_rl.data.validate`:
    images opened, chosen and rejected readable): a DataError lists every problem, unless `config.skip_bad_rows`."""
    from vlm_rl.data.formats import load_samples
    from vlm_rl.data.validate import check_data

    config = config or RewardTrainingConfig()
    report = check_data(path, "reward", split=split, column_map=config.column_map)
    bad = report.rows_to_skip(config.skip_bad_rows, config.max_bad_row_fraction)
    dataset = load_samples(path, split=split, check_images=False, column_map=config.column_map, skip=bad.sources)
    for row in dataset.rows:
        row["chosen"] = completion_text(row["chosen"])
        row["rejected"] = completion_text(row["rejected"])
    return dataset, bad


class PairCollator:
    """Samples -> one batch of 2B sequences: the B chosen, then the B rejected (images and videos repeated).

    With ``cache=True`` each pair is run through the processor once (keyed by its ``_source``) and later batches
    only pad and concatenate the stored tensors: for small models the image processor costs about as much as
    the forward. It keeps every pair's ``pixel_values`` in memory, so it is meant for small data sets.
    ``family`` (vlm_rl.models.families) says how the processor lays out the images and videos, so that they can be
    split per image and per video.
    """

    TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # per-token tensors, padded per batch

    def __init__(self, processor, family: Family, padding_side: str, max_length: int | None, cache: bool = False):
        self.processor = processor
        self.layouts = {"num_images": family.image_layout, "num_videos": family.video_layout}  # each kind's tensors
        self.padding_side = padding_side
        self.max_length = max_length
        self.cache: dict[str, dict] | None = {} if cache else None

    def _encode(self, samples: list[dict]) -> dict:
        from reward_models.vlm_reward import encode_for_reward

        prompts = [s["prompt"] for s in samples] * 2
        completions = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
        images = [s["images"] for s in samples] * 2
        videos = [s.get("videos") or [] for s in samples] * 2
        names = [f"{s['_source']} (chosen)" for s in samples] + [f"{s['_source']} (rejected)" for s in samples]
        batch = encode_for_reward(self.processor, prompts, completions, images, self.padding_side, self.max_length, names, videos=videos)
        batch["sample_names"] = names
        return batch

    def _encoded_pair(self, sample: dict) -> dict:
        key = sample["_source"]
        if key not in self.cache:
            batch = self._encode([sample])
            mask = batch["attention_mask"].bool()  # (2, T)
            media = {}  # per kind ("num_images", "num_videos"): (how many the pair's prompt holds, chosen's copy, rejected's)
            for kind, layout in self.layouts.items():
                n = batch[kind][0] if kind in batch else 0
                items = layout.split({k: batch[k] for k in layout.keys if k in batch}) if n else []
                media[kind] = (n, items[:n], items[n:])
            self.cache[key] = {
                "sequences": [{k: batch[k][i][mask[i]] for k in self.TOKEN_KEYS if k in batch} for i in range(2)],
                "media": media,
                "sample_names": batch["sample_names"],
            }
        return self.cache[key]

    def __call__(self, samples: list[dict]) -> dict:
        if self.cache is None:
            return self._encode(samples)
        pairs = [self._encoded_pair(s) for s in samples]
        sequences = [p["sequences"][0] for p in pairs] + [p["sequences"][1] for p in pairs]
        length = max(s["input_ids"].shape[0] for s in sequences)
        fills = {"input_ids": self.processor.tokenizer.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
        batch: dict = {}
        for key in sequences[0]:
            rows = []
            for s in sequences:
                pad = s[key].new_full((length - s[key].shape[0],), fills[key])
                rows.append(torch.cat([s[key], pad] if self.padding_side == "right" else [pad, s[key]]))
            batch[key] = torch.stack(rows)
        for kind, layout in self.layouts.items():
            counts = [p["media"][kind][0] for p in pairs] * 2
            if kind == "num_images" or sum(counts):  # (num_videos only for batches with videos, as encode_for_reward)
                batch.update(join_images([item for half in (1, 2) for p in pairs for item in p["media"][kind][half]], layout.keys))
                batch[kind] = counts
        batch["sample_names"] = [p["sample_names"][0] for p in pairs] + [p["sample_names"][1] for p in pairs]
        return batch


def bradley_terry_loss(rewards: torch.Tensor, center_coef: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (2B,) = [chosen..., rejected...] -> (mean loss, margins (B,))."""
    chosen, rejected = rewards.chunk(2)
    margins = chosen - rejected
    loss = -F.logsigmoid(margins).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss, margins


@torch.no_grad()
def evaluate(model, dataloader, accelerator) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected), BT loss and mean margin over the whole eval set, all processes."""
    was_training = model.training
    model.eval()
    margins = []
    for batch in dataloader:
        rewards = model(**batch, where="reward model eval forward")
        _, m = bradley_terry_loss(rewards.float())
        margins.append(accelerator.gather_for_metrics(m.detach()))
    model.train(was_training)
    m = torch.cat(margins).float().cpu()
    return {
        "eval_accuracy": int((m > 0).sum()) / m.numel(),
        "eval_loss": float(-F.logsigmoid(m).mean()),
        "eval_margin_mean": float(m.mean()),
        "eval_pairs": int(m.numel()),
    }


# ------------------------------------------------------------------------------------------ training


def log_step(accelerator, step: int, losses: list[float], learning_rate: float) -> dict:
    """One ``log_history`` entry: the loss of the micro-batches since the last entry (mean over processes), the LR."""
    local = torch.tensor(sum(losses) / max(1, len(losses)), dtype=torch.float64, device=accelerator.device)
    return {"step": step, "loss": float(accelerator.reduce(local, "mean")), "learning_rate": learning_rate}


def train(config: RewardTrainingConfig) -> dict:
    """Train, evaluate and save; returns the eval results (also written to output_dir/eval_results.json)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from reward_models.vlm_reward import VLMRewardModel
    from vlm_rl.data.synthetic import resolve_data_path

    start_time = time.perf_counter()
    if not config.overwrite_output_dir:  # before anything loads; the save below checks again
        refuse_existing_output(config.output_dir)
    accelerator = Accelerator(
        cpu=config.use_cpu,
        mixed_precision="bf16" if config.bf16 else "no",
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
    set_seed(config.seed)
    with PartialState().main_process_first():  # rank 0 builds the embedded defaults; the others then read them
        model_path = require_model(config.model_name_or_path)
        train_path = resolve_data_path(config.train_data, "preferences")
        eval_path = resolve_data_path(config.eval_data, "preferences_test") if config.eval_data else None
    train_set, train_bad = load_pairs(train_path, config.train_split, config)  # every row checked before the model loads
    eval_set, eval_bad = load_pairs(eval_path, config.eval_split, config) if eval_path is not None else (None, None)
    skipped = [b for b in (train_bad, eval_bad) if b is not None]
    # With several processes and videos in the data, every forward calls the tower once per kind (dummy_image.py).
    expect_videos(any(d is not None and d.has_videos() for d in (train_set, eval_set)))

    model = VLMRewardModel.from_base(
        model_path,
        name=config.name,
        batch_size=config.per_device_eval_batch_size * 2,
        padding_side=config.padding_side,
        max_length=config.max_length,
        metadata={"trained_with": "reward_models.train_reward"},
    )
    if config.min_pixels is not None or config.max_pixels is not None:
        from vlm_rl.models.loading import load_processor

        model.processor = load_processor(model_path, config.min_pixels, config.max_pixels)
    for dataset in (train_set, eval_set):  # images sized for this processor, as PPO sizes the policy's
        if dataset is not None:
            dataset.resize = image_resize(model_path, model.processor)
    if config.use_peft:
        model.enable_lora(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    elif config.freeze_vision_tower:
        for module in family_of(model.base_backbone).vision_encoder(model.base_backbone):
            module.requires_grad_(False)
    if config.gradient_checkpointing:
        model.base_backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    if eval_set is not None:
        train_indices = list(range(len(train_set)))
        eval_indices = list(range(len(eval_set)))
    else:
        eval_set = train_set
        generator = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(train_set), generator=generator).tolist()
        n_eval = int(round(len(train_set) * config.eval_fraction))
        if config.eval_fraction > 0 and n_eval == 0:
            n_eval = 1
        if n_eval >= len(train_set):
            raise DataError(f"{train_path}: {len(train_set)} pairs are too few to hold out {n_eval} for evaluation. Give more pairs, a smaller --eval_fraction, or --eval_data.")
        eval_indices, train_indices = sorted(order[:n_eval]), sorted(order[n_eval:])
    train_data = torch.utils.data.Subset(train_set, train_indices)
    eval_data = torch.utils.data.Subset(eval_set, eval_indices) if eval_indices else None

    collate = PairCollator(model.processor, family_of(model.base_backbone), config.padding_side, config.max_length, cache=config.cache_encodings)
    train_loader = DataLoader(
        train_data,
        batch_size=config.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    eval_loader = (
        DataLoader(eval_data, batch_size=config.per_device_eval_batch_size, shuffle=False, collate_fn=collate, num_workers=config.dataloader_num_workers)
        if eval_data is not None
        else None
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2)
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Every process takes the same optimiser steps: as many as its shard of the loader gives.
    updates_per_epoch = max(1, math.ceil(len(train_loader) / config.gradient_accumulation_steps))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * updates_per_epoch)
    num_epochs = math.ceil(total_steps / updates_per_epoch)
    # A schedule over the optimiser steps, stepped once per step (as transformers.Trainer does). Not given to
    # accelerator.prepare: its AcceleratedScheduler steps num_processes times per update (it expects a schedule
    # over the un-sharded loader's batches), which would end this schedule after 1/num_processes of the run.
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    accelerator.print(
        f"reward model: {len(train_data)} training pairs, {len(eval_data) if eval_data is not None else 0} eval pairs, "
        f"{total_steps} optimiser steps ({num_epochs} epoch(s) of {updates_per_epoch}), "
        f"{sum(p.numel() for p in trainable):,} trainable parameters, {accelerator.num_processes} process(es)"
    )
    history = []
    log_history = []
    step = 0
    for epoch in range(num_epochs):
        losses, correct, seen, logged = [], 0, 0, 0
        for batch in train_loader:
            with accelerator.accumulate(model):
                rewards = model(**batch, where="reward model training forward")
                loss, margins = bradley_terry_loss(rewards, config.center_rewards_coefficient)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float().item())
            correct += int((margins.detach() > 0).sum())
            seen += margins.shape[0]
            if accelerator.sync_gradients:
                learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                step += 1
                if config.logging_steps and step % config.logging_steps == 0:
                    log_history.append(log_step(accelerator, step, losses[logged:], learning_rate))
                    logged = len(losses)
                    accelerator.print(
                        f"step {step}/{total_steps}  loss {log_history[-1]['loss']:.4f}  lr {learning_rate:.3g}"
                    )
                if step >= total_steps:
                    break
        totals = accelerator.reduce(
            torch.tensor([sum(losses), len(losses), correct, seen], dtype=torch.float64, device=accelerator.device), "sum"
        ).tolist()  # over all processes
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": totals[0] / max(1.0, totals[1]),
            "train_accuracy": totals[2] / max(1.0, totals[3]),
        }
        last_epoch = step >= total_steps or epoch == num_epochs - 1
        if eval_loader is not None and (config.eval_each_epoch or last_epoch):
            record.update(evaluate(model, eval_loader, accelerator))
        history.append(record)
        accelerator.print(
            f"epoch {epoch + 1}/{num_epochs}  train loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.3f}"
            + (f"  eval acc {record['eval_accuracy']:.3f}  eval loss {record['eval_loss']:.4f}" if "eval_accuracy" in record else "")
        )
        if step >= total_steps:
            break

    final = evaluate(model, eval_loader, accelerator) if eval_loader is not None else {}
    runtime = time.perf_counter() - start_time
    results = {
        **final,
        "train_pairs": len(train_data),
        "global_step": step,
        "epochs": history,
        "log_history": log_history,
        "train_runtime_s": round(runtime, 2),
        "num_processes": accelerator.num_processes,
        "config": asdict(config),
    }
    resolved = {
        **asdict(config), "model_name_or_path": model_path, "train_data": train_path, "eval_data": eval_path,
        "num_processes": accelerator.num_processes,
    }
    skipped_text = skipped_rows_jsonl(skipped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(
            config.output_dir,
            extra={"train_data": str(train_path), "eval_data": str(eval_path) if eval_path else None, **{k: v for k, v in final.items()}},
            extra_files={
                "eval_results.json": json.dumps(results, indent=2) + "\n", TRAIN_CONFIG_FILE: run_config_yaml(resolved),
                **({SKIPPED_ROWS_FILE: skipped_text} if skipped_text else {}),
            },
            overwrite=config.overwrite_output_dir,
        )
        announce_skipped(skipped, Path(config.output_dir) / SKIPPED_ROWS_FILE)
        if final:
            accelerator.print(
                f"held-out pairwise accuracy {final['eval_accuracy']:.3f} on {final['eval_pairs']} pairs "
                f"(eval loss {final['eval_loss']:.4f}); {runtime:.1f}s; reward model written to {config.output_dir}"
            )
        else:
            accelerator.print(f"no eval pairs; {runtime:.1f}s; reward model written to {config.output_dir}")
    accelerator.wait_for_everyone()
    return results


def main(argv: list[str] | None = None) -> dict:
    import sys

    from vlm_rl.arguments import parse_config
    from vlm_rl.launch import start_process

    start_process("train-reward")
    config = parse_config(RewardTrainingConfig, sys.argv[1:] if argv is None else argv, "vlm-rl train-reward")
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)
    return train(config)


if __name__ == "__main__":
    import sys

    from vlm_rl.errors import run_command

    run_command("train-reward", main, sys.argv[1:])
