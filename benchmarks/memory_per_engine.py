"""Model-state memory per rank under each distributed engine, measured in PPO's first optimiser step on 2 CPU ranks,
beside the figures two formulas give: the engine's own layout (where it keeps what) and the textbook accounting.

Engines: DDP (`accelerate launch --multi_gpu`, `--use_cpu true`) and DeepSpeed ZeRO-2 and ZeRO-3
(`DS_ACCELERATOR=cpu`, `configs/accelerate/zero2.yaml` / `zero3.yaml`), each launched the way
`tests/training/test_sharding.py` launches `scripts/ppo.py`: fp32 (`--mixed_precision no`) by default, bf16 with `--bf16`.
FSDP2 (`configs/accelerate/fsdp2.yaml`): accelerate turns FSDP on for GPU-like devices only, so on CPU ranks the
launched rank first loads the test shim `tests/multiprocess/fsdp_on_cpu.py` (which lets accelerate's FSDP2
preparation run there, as `tests/training/test_sharding.py` does); the trainer code is the one a GPU run takes.

Each launch runs this file as the PPO entry point (`vlm_rl.ppo.main`, the code `scripts/ppo.py` runs) with a probe
added to the trainer. When training starts, the probe arms a global optimizer-step post-hook; at the first step
after that (DeepSpeed's own start-up steps come before training starts) each rank sums `untyped_storage().nbytes()`
over every live tensor `gc.get_objects()` reaches, plus the `.grad` of each leaf, counting each storage once (by
data pointer). That is the policy, value head, reference, gradients and optimizer state, whatever the engine's
layout, and no activations (the backward is over). Small tensors that are not model states (the rollout batch,
cached image features) are in the sum too. Engine buckets are reported apart: DDP's gradient buckets, which live
in C++ (their sizes from DDP's logging data), and DeepSpeed's gradient-reduction bucket (a tensor of
`reduce_bucket_size` elements). It measures again after the iteration ("between steps").

The model: a random-weight Qwen2-VL of about 32M parameters (the tiny model's tokenizer, 8 language layers of width
512, a small frozen vision tower) so that model states dominate; built locally, no downloads. One PPO iteration of
2 prompts per rank, one epoch, one optimiser step; each launch takes under a minute here.

    python benchmarks/memory_per_engine.py [--engines ddp zero2 zero3] [--bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_ENV = "VLM_RL_MEMORY_PROBE_DIR"  # set for the launched ranks: where each writes its measurement
RANKS = 2
MiB = 2**20

# The language model is most of the parameters; the vision tower (frozen by default, as in `vlm-rl ppo`) is small.
SIZE = dict(vision_depth=2, vision_dim=128, vision_heads=2, hidden=512, layers=8, intermediate=2048, heads=8, kv_heads=2)


# ---- the formulas: bytes per rank, from the parameter counts (policy P with its value head, trained P_t, reference
# P_ref) and the number of ranks n. Weights and gradients take 4 bytes each in fp32, 2 in bf16; AdamW's two moments 8.


def textbook(c: dict, n: int, bf16: bool, sharded: tuple[str, ...]) -> dict:
    """The usual accounting: weights, gradients of the trained parameters, AdamW (fp32 moments, and in bf16 an fp32
    master copy: 12 bytes), reference; the `sharded` terms split over the n ranks."""
    w, t = (2 if bf16 else 4), c["trainable"]
    terms = {"weights": w * c["params"], "grads": w * t, "adam": (12 if bf16 else 8) * t, "reference": w * c["reference"]}
    return {k: v / n if k in sharded else v for k, v in terms.items()}


def ddp_layout(c: dict, n: int, bf16: bool) -> dict:
    """DDP as vlm-rl runs it: the policy's weights fp32 whole on every rank (the master weights; bf16 is autocast),
    fp32 gradients and AdamW moments of the trained ones, the frozen reference held as the policy is (fp32: under
    the same autocast it computes the policy's own starting logprobs)."""
    t = c["trainable"]
    return {"weights": 4 * c["params"], "grads": 4 * t, "adam": 8 * t, "reference": 4 * c["reference"]}


def deepspeed_layout(stage: int):
    """ZeRO-2/3: the module cast to the compute dtype (weights whole under ZeRO-2, 1/n under ZeRO-3, the reference
    likewise); this rank's gradient partition in that dtype, and during the step an fp32 copy of it for the
    optimizer; an fp32 master copy of the partition of trained weights (kept in fp32 training too) and its moments."""

    def layout(c: dict, n: int, bf16: bool) -> dict:
        w, t = (2 if bf16 else 4), c["trainable"]
        split = n if stage == 3 else 1
        return {"weights": w * c["params"] / split, "grads": w * t / n, "fp32 grads for the step": 4 * t / n,
                "master": 4 * t / n, "adam": 8 * t / n, "reference": w * c["reference"] / split}

    return layout


def fsdp2_layout(c: dict, n: int, bf16: bool) -> dict:
    """FSDP2: the fp32 weights sharded 1/n (they are the master weights; bf16 compute gathers a
    layer at a time), fp32 gradients and moments 1/n, the reference held and sharded as the policy is."""
    t = c["trainable"]
    return {"weights": 4 * c["params"] / n, "grads": 4 * t / n, "adam": 8 * t / n, "reference": 4 * c["reference"] / n}


@dataclass
class Engine:
    name: str
    launch: list[str]  # `accelerate launch` flags
    ppo_flags: list[str]  # extra flags to scripts/ppo.py
    layout: Callable[[dict, int, bool], dict]  # (counts, ranks, bf16) -> {term: bytes per rank}, where it keeps what
    sharded: tuple[str, ...]  # the terms the textbook accounting splits over the ranks
    env: dict = field(default_factory=dict)


DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu"}
EVERYTHING = ("weights", "grads", "adam", "reference")
ENGINES = {
    "ddp": Engine("DDP", ["--multi_gpu"], ["--use_cpu", "true"], ddp_layout, ()),
    "zero2": Engine("ZeRO-2", ["--config_file", "configs/accelerate/zero2.yaml"], [], deepspeed_layout(2), ("grads", "adam"), DEEPSPEED_ENV),
    "zero3": Engine("ZeRO-3", ["--config_file", "configs/accelerate/zero3.yaml"], [], deepspeed_layout(3), EVERYTHING, DEEPSPEED_ENV),
    "fsdp2": Engine("FSDP2", ["--config_file", "configs/accelerate/fsdp2.yaml"], [], fsdp2_layout, EVERYTHING),
}


# ---- the probe, inside each launched rank -----------------------------------------------------------------------


def live_tensor_bytes(bucket_elements: int | None = None) -> dict:
    """Every live tensor's storage that `gc.get_objects()` reaches, and each leaf's `.grad`, counted once per storage
    (by device and data pointer): {"bytes", "storages", "bucket_bytes"}, the last the storages of exactly
    `bucket_elements` elements (DeepSpeed's gradient-reduction bucket, allocated whole whatever the model's size)."""
    import torch

    storages: dict[tuple, tuple[int, int]] = {}  # (device, pointer) -> (bytes, elements)

    from torch.distributed.tensor import DTensor

    def add(t) -> None:
        if isinstance(t, DTensor):  # FSDP2's sharded parameters, gradients and moments: this rank's shard
            t = t.to_local()
        try:
            storage = t.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse tensors; storages FSDP2 freed after use
            return
        if pointer and t.device.type != "meta":
            storages[(t.device.type, pointer)] = (storage.nbytes(), storage.nbytes() // t.element_size())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                add(obj)
                if obj.is_leaf and obj.grad is not None:
                    add(obj.grad)
    sizes = storages.values()
    bucket = sum(b for b, n in sizes if bucket_elements and n == bucket_elements)
    return {"bytes": sum(b for b, _ in sizes), "storages": len(storages), "bucket_bytes": bucket}


def parameter_counts(trainer) -> dict:
    """Parameters of the policy with its value head (all and trained) and of the reference; under ZeRO-3 the
    whole sizes (`ds_numel`), not this rank's partition."""

    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    policy = list(trainer.model.parameters())
    reference = list(trainer.ref_model.parameters()) if trainer.ref_model is not None else []
    return {
        "params": sum(numel(p) for p in policy),
        "trainable": sum(numel(p) for p in policy if p.requires_grad),
        "reference": sum(numel(p) for p in reference),
    }


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(trainer, out_dir: Path):
    """A callback that measures this rank twice: inside the first optimiser step of training, right after the
    optimizer's update (gradients still held), and after that PPO iteration (between steps)."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import TrainerCallback

    class MemoryProbe(TrainerCallback):
        def __init__(self):
            self.figures: dict = {}

        def bucket_elements(self) -> int | None:
            return getattr(getattr(trainer.model_wrapped, "optimizer", None), "reduce_bucket_size", None)  # DeepSpeed's

        def snapshot(self) -> dict:
            gc.collect()
            figures = {**live_tensor_bytes(self.bucket_elements()), "rss_mib": rss_mib()}
            if isinstance(trainer.model_wrapped, DistributedDataParallel):  # its gradient buckets live in C++
                sizes = str(trainer.model_wrapped._get_ddp_logging_data().get("bucket_sizes", ""))
                figures["bucket_bytes_outside"] = sum(int(b) for b in sizes.split(",") if b.strip())
            return figures

        def on_train_begin(self, args, state, control, **kwargs):  # after `prepare`: DeepSpeed's start-up steps are over
            self.handle = register_optimizer_step_post_hook(self.at_step)

        def at_step(self, optimizer, *_):  # (a ZeRO-3 model over sub_group_size would step in parts: not these)
            self.handle.remove()
            self.figures = {"at_step": self.snapshot(), "optimizer": type(optimizer).__qualname__}

        def on_step_end(self, args, state, control, **kwargs):
            if "between_steps" in self.figures:
                return
            rank = trainer.accelerator.process_index
            self.figures.update(between_steps=self.snapshot(), rank=rank, counts=parameter_counts(trainer),
                                bucket_elements=self.bucket_elements(), distributed_type=str(trainer.accelerator.distributed_type))
            (out_dir / f"rank{rank}.json").write_text(json.dumps(self.figures))

    return MemoryProbe()


def run_probed_ppo(argv: list[str]) -> None:
    """`scripts/ppo.py` with the probe added to the trainer `vlm_rl.ppo.main` builds."""
    from vlm_rl.errors import run_command  # first, as scripts/ppo.py imports

    import vlm_rl.ppo as ppo

    if os.environ.get("ACCELERATE_USE_FSDP") == "true":  # FSDP on CPU ranks: the test shim (see the docstring)
        runpy.run_path(str(REPO / "tests" / "multiprocess" / "fsdp_on_cpu.py"), run_name="fsdp_on_cpu")
    build = ppo.build_trainer

    def build_with_probe(config):
        trainer = build(config)
        trainer.add_callback(probe(trainer, Path(os.environ[PROBE_ENV])))
        return trainer

    ppo.build_trainer = build_with_probe
    run_command("ppo", ppo.main, argv)


# ---- the driver --------------------------------------------------------------------------------------------------


def make_model(out_dir: Path) -> Path:
    """The random Qwen2-VL of `SIZE` with the tiny model's processor, saved to `out_dir`."""
    import torch
    from _common import qwen2vl_config
    from transformers import Qwen2VLForConditionalGeneration

    from vlm_rl.models.tiny import build_processor

    processor = build_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(qwen2vl_config(processor.tokenizer, **SIZE))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---- the same layouts at GPU scale (--gpu-table): Qwen2-VL-2B, 7B and 72B in bf16 on 8 and 16 GPUs -----------------

# The language models of Qwen2-VL-{2B,7B,72B}-Instruct (their config.json); all three have the same vision tower
# (32 blocks of width 1,280), whose merger ends at the language model's width.
QWEN2_VL = {
    "2B": dict(hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, vocab=151936, tied=True),
    "7B": dict(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied=False),
    "72B": dict(hidden=8192, layers=80, intermediate=29568, heads=64, kv_heads=8, vocab=152064, tied=False),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the family's default
GB = 1e9
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements), which the accelerate configs leave as is


def qwen2_vl_counts(size: str, lora_r: int = 16) -> dict:
    """Parameter counts of Qwen2-VL-`size` from the model built on the meta device (no weights): the policy with a
    value head (`params`), its trained part with the vision tower frozen (`trainable`), the reference, and LoRA's
    (`lora`: rank `lora_r` on the language model's projections)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    s = QWEN2_VL[size]
    head_dim = s["hidden"] // s["heads"]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=s["hidden"], mlp_ratio=4, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=s["tied"],
    )
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    lora = sum(lora_r * (m.in_features + m.out_features) for name, m in model.model.language_model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS)
    value_head = s["hidden"] + 1
    return {"params": total + value_head, "trainable": total - vision + value_head, "reference": total, "lora": lora, "vision": vision}


def gpu_rows(c: dict, n: int) -> dict[str, tuple[float, float, float]]:
    """Per GPU in bf16, for each way to train: (model states at the step, engine buckets, CPU RAM per rank) in bytes."""
    ddp, zero2, zero3 = ddp_layout(c, n, True), deepspeed_layout(2)(c, n, True), deepspeed_layout(3)(c, n, True)
    offloaded = ("fp32 grads for the step", "master", "adam")  # zero3_offload.yaml: the optimizer's part in CPU RAM
    lora = {"base (bf16, also the reference)": 2 * c["reference"], "adapters, grads, adam (fp32)": 16 * c["lora"]}
    return {
        "DDP": (sum(ddp.values()), 4 * c["trainable"], 0.0),
        "ZeRO-2": (sum(zero2.values()), 0.0, 0.0),  # its REDUCE_BUCKET lives during the backward only
        "ZeRO-3": (sum(zero3.values()), 2 * REDUCE_BUCKET, 0.0),
        "ZeRO-3 + offload": (sum(v for k, v in zero3.items() if k not in offloaded), 2 * REDUCE_BUCKET,
                             sum(v for k, v in zero3.items() if k in offloaded)),
        "FSDP2": (sum(fsdp2_layout(c, n, True).values()), 0.0, 0.0),
        "LoRA r=16, DDP": (sum(lora.values()), 4 * c["lora"], 0.0),
        # the base sharded and cast to bf16 like the policy under ZeRO-3, the adapters as its trained parameters
        "LoRA r=16, ZeRO-3": ((2 * c["reference"] + 18 * c["lora"]) / n, 2 * REDUCE_BUCKET, 0.0),
    }


def gpu_table() -> None:
    for size in QWEN2_VL:
        c = qwen2_vl_counts(size)
        print(f"Qwen2-VL-{size}: P = {c['params']:,} (with the value head), trained P_t = {c['trainable']:,} "
              f"(vision tower of {c['vision']:,} frozen), reference {c['reference']:,}, LoRA r=16 {c['lora']:,}")
        print(f"  GB per GPU, bf16{'':<12}" + "".join(f"{f'{n} GPUs: states + buckets (CPU RAM/rank)':>44}" for n in (8, 16)))
        rows = {n: gpu_rows(c, n) for n in (8, 16)}
        for name in rows[8]:
            cells = []
            for n in (8, 16):
                states, buckets, cpu = rows[n][name]
                cells.append(f"{states / GB:,.1f} + {buckets / GB:,.1f} = {(states + buckets) / GB:,.1f}" + (f" ({cpu / GB:,.1f})" if cpu else ""))
            print(f"  {name:<28}" + "".join(f"{cell:>44}" for cell in cells))
        print(f"  ZeRO-3 generation with ds3_gather_for_generation: the whole policy gathered, 2P = {2 * c['params'] / GB:,.1f} GB")


def launch(engine: Engine, root: Path, model_dir: Path, data: Path, bf16: bool) -> tuple[list[dict], float]:
    """One PPO iteration under `engine` on `RANKS` CPU ranks: each rank's measurement, and the launch's seconds."""
    out = root / engine.name
    out.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(RANKS),
           "--mixed_precision", "bf16" if bf16 else "no", "--dynamo_backend", "no", *engine.launch, str(Path(__file__).resolve()),
           "--config", "configs/ppo_tiny.yaml", "--model_name_or_path", str(model_dir), "--train_data", str(data),
           "--output_dir", str(out / "run"), "--report_to", "none", "--num_sample_generations", "0", "--max_new_tokens", "6",
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_mini_batches", "1",
           "--num_ppo_epochs", "1", "--local_rollout_forward_batch_size", "2", "--total_episodes", str(2 * RANKS),
           "--learning_rate", "1e-5", "--save_steps", "0", "--bf16", str(bf16).lower(),
           *engine.ppo_flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", PROBE_ENV: str(out), **engine.env}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{engine.name} launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)], seconds


def summarise(key: str, ranks: list[dict], seconds: float, bf16: bool) -> dict:
    """One engine's figures in MiB per rank: model states at the step and between steps (the engine's buckets
    apart), the buckets, and the two formulas' figures (the layout's with its terms)."""
    engine, counts = ENGINES[key], ranks[0]["counts"]
    terms = engine.layout(counts, RANKS, bf16)
    computed = sum(terms.values()) / MiB

    def states(snapshot: dict) -> float:
        return round((snapshot["bytes"] - snapshot["bucket_bytes"]) / MiB, 2)

    at_step = [states(r["at_step"]) for r in ranks]
    first = ranks[0]["at_step"]
    return {
        "at_step_mib": at_step, "between_steps_mib": [states(r["between_steps"]) for r in ranks],
        "computed_mib": round(computed, 2), "computed_terms_mib": {k: round(v / MiB, 2) for k, v in terms.items()},
        "measured_vs_computed": round(max(at_step) / computed, 3),
        "textbook_mib": round(sum(textbook(counts, RANKS, bf16, engine.sharded).values()) / MiB, 2),
        "buckets_mib": round((first["bucket_bytes"] + first.get("bucket_bytes_outside", 0)) / MiB, 2),
        "rss_mib_at_step": [round(r["at_step"]["rss_mib"]) for r in ranks], "optimizer": ranks[0]["optimizer"],
        "distributed_type": ranks[0]["distributed_type"], "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=list(ENGINES))
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--json", default=None)
    parser.add_argument("--gpu-table", action="store_true", help="print the layouts' figures for Qwen2-VL-2B/7B/72B in bf16 and exit")
    args = parser.parse_args()
    if args.gpu_table:
        gpu_table()
        return
    from _common import write_json

    from vlm_rl.data.synthetic import make_synthetic_data

    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_model(root / "model")
    data = make_synthetic_data(root / "data", n=4 * RANKS, test_fraction=0.0) / "train.jsonl"
    results = {key: launch(ENGINES[key], root, model_dir, data, args.bf16) for key in args.engines}

    figures = {key: summarise(key, ranks, seconds, args.bf16) for key, (ranks, seconds) in results.items()}
    ddp = max(figures["ddp"]["at_step_mib"]) if "ddp" in figures else None
    for f in figures.values():
        f["vs_ddp"] = round(max(f["at_step_mib"]) / ddp, 3) if ddp else None
    counts = next(iter(results.values()))[0][0]["counts"]
    precision = "bf16 (--mixed_precision bf16 --bf16 true), PPO with a value head" if args.bf16 else "fp32 (--mixed_precision no), PPO with a value head"
    print(f"Model states per rank in the first optimiser step, {RANKS} CPU ranks, {precision}")
    print(f"  random Qwen2-VL {SIZE}")
    print(f"  policy + value head P = {counts['params']:,} parameters, trained P_t = "
          f"{counts['trainable']:,} (vision tower frozen), reference P_ref = {counts['reference']:,}")
    print(f"  {'MiB per rank':>37}{'computed':>10}{'measured /':>12}{'':>10}{'':>8}{'between':>10}{'engine':>10}{'launch':>8}")
    print(f"  {'engine':<8}{'at step (rank 0 / 1)':>29}{'(layout)':>10}{'computed':>12}{'textbook':>10}{'vs DDP':>8}"
          f"{'steps':>10}{'buckets':>10}{'s':>8}")
    for key, f in figures.items():
        per_rank = " / ".join(f"{m:,.1f}" for m in f["at_step_mib"])
        vs_ddp = "-" if f["vs_ddp"] is None else f"{f['vs_ddp']:.3f}"
        print(f"  {ENGINES[key].name:<8}{per_rank:>29}{f['computed_mib']:>10,.1f}{f['measured_vs_computed']:>12.3f}"
              f"{f['textbook_mib']:>10,.1f}{vs_ddp:>8}{max(f['between_steps_mib']):>10,.1f}{f['buckets_mib']:>10,.1f}{f['seconds']:>8.0f}")
    print("  computed (layout), MiB per rank:")
    for key, f in figures.items():
        print(f"    {ENGINES[key].name:<8}" + " + ".join(f"{k} {v:,.1f}" for k, v in f["computed_terms_mib"].items()))
    print("  at step: live tensors right after the optimizer's update (gradients still held); between steps: after the\n"
          "  iteration; engine buckets (in neither): DDP's gradient buckets (C++), DeepSpeed's reduction bucket\n"
          "  (reduce_bucket_size elements, allocated whole; untouched pages on CPU)")
    write_json(args.json, {"engines": figures, "counts": counts, "ranks": RANKS, "size": SIZE, "bf16": args.bf16})


if __name__ == "__main__":
    if PROBE_ENV in os.environ:  # a rank launched by `launch` above
        run_probed_ppo(sys.argv[1:])
    else:
        main()
