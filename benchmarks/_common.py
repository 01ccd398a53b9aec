"""Shared set-up for the benchmarks: the tiny model and synthetic prompts, a Qwen2-VL with Qwen2-VL-2B's
proportions, timing, peak memory and the `--json` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Qwen/Qwen2-VL-2B-Instruct's config.json: the vision tower and the language model.
QWEN2_VL_2B = dict(
    vision_depth=32, vision_dim=1280, vision_heads=16, hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2
)
# Its proportions on 2 CPU cores: widths / 8 and depths cut so that the vision tower's share of a forward's FLOPs
# over one 448x448 image (256 merged tokens, 1,024 patches) + 100 text + 64 response tokens is the 2B's (0.56;
# with the widths / 8 alone the tower's attention over 1,024 patches would weigh relatively more).
QWEN2_VL_2B_ON_CPU = dict(
    vision_depth=7, vision_dim=160, vision_heads=2, hidden=192, layers=11, intermediate=1120, heads=3, kv_heads=1
)
# A slice of Qwen2-VL-2B: its widths, 2 vision and 2 language layers. Per layer, weights, optimiser state and
# activations weigh what they weigh in the 2B, so memory ratios (full fine-tuning vs LoRA) carry over to it.
QWEN2_VL_2B_SLICE = dict(QWEN2_VL_2B, vision_depth=2, layers=2)
SIZES = {"cpu": QWEN2_VL_2B_ON_CPU, "2b": QWEN2_VL_2B, "2b-slice": QWEN2_VL_2B_SLICE}
IMAGE_SIDE = 448  # pixels: 32 x 32 patches of 14, merged 2 x 2 into 256 vision tokens


def add_machine_arguments(parser) -> None:
    """The flags every timing benchmark takes: --device, --bf16, --threads, --json."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights), as --bf16 in PPO")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the headline figures to this file")


def machine(args):
    """The device of `add_machine_arguments`' flags, with torch's CPU threads set from them."""
    import torch

    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def sized_model_and_prompts(size: str, n: int, text_tokens: int) -> tuple[Path, Path, list[dict]]:
    """(a fresh temporary folder, a random-weight model of `SIZES[size]` saved in it, `n` synthetic prompts of about
    `text_tokens` text tokens each, one image each)."""
    from transformers import AutoProcessor

    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_sized_model(root / "model", size)
    return root, model_dir, synthetic_samples(root, n, text_tokens, AutoProcessor.from_pretrained(model_dir))


def model_setup(size: str = "tiny", n: int = 64, device: str = "cpu", bf16: bool = False, image_side: int | None = None):
    """(model, processor, samples): the embedded tiny Qwen2-VL (`size` "tiny") or one of `SIZES` (random weights,
    448 x 448 images), on `device` (bf16 weights with `bf16`), and `n` synthetic prompts. `image_side`: every image
    resized to that many pixels square."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vlm_rl.models.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="vlm-rl-bench-"))
    model_dir = make_tiny_model(root / "model") if size == "tiny" else make_sized_model(root / "model", size)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    if image_side is not None:
        processor.image_processor.size = {"shortest_edge": image_side**2, "longest_edge": image_side**2}
    return model, processor, synthetic_samples(root, n)


def synthetic_samples(root: Path, n: int, text_tokens: int | None = None, processor=None) -> list[dict]:
    """`n` synthetic VQA prompts (one image each); with `text_tokens`, each prompt's text is lengthened with an
    instruction to about that many text tokens (chat template included)."""
    from vlm_rl.data.formats import load_samples
    from vlm_rl.data.synthetic import make_synthetic_data

    samples = list(load_samples(make_synthetic_data(root / "data", n=n, test_fraction=0.0) / "train.jsonl"))
    if text_tokens is None:
        return samples
    tokenizer = processor.tokenizer
    filler = " Describe the image. A picture of a red square on the left."
    for s in samples:
        part = s["prompt"][-1]["content"][-1]
        rendered = processor.apply_chat_template(s["prompt"], add_generation_prompt=True, tokenize=False)
        have = len(tokenizer(rendered)["input_ids"]) - 1  # the image placeholder counts as one here
        while have < text_tokens:
            part["text"] += filler
            have += len(tokenizer(filler)["input_ids"])
    return samples


def qwen2vl_config(tokenizer, vision_depth, vision_dim, vision_heads, hidden, layers, intermediate, heads, kv_heads):
    """A Qwen2-VL config of the given sizes (random weights), special ids read from `tokenizer`."""
    from transformers import Qwen2VLConfig

    from vlm_rl.models.tiny import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    quarter = hidden // heads // 16  # M-RoPE sections (temporal, height, width) in the 2B's 16:24:24, half the head dim
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=4, num_heads=vision_heads,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def make_sized_model(out_dir: Path, size: str = "cpu", seed: int = 0) -> Path:
    """A random-weight Qwen2-VL of `SIZES[size]` with the tiny model's tokenizer (463 ids), whose processor turns
    every image into 448 x 448 pixels (256 vision tokens), saved to `out_dir`."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vlm_rl.models.tiny import build_processor

    processor = build_processor()
    pixels = IMAGE_SIDE * IMAGE_SIDE
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(qwen2vl_config(processor.tokenizer, **SIZES[size]))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def forward_flops(sizes: dict, patches: int = 1024, text: int = 100, response: int = 64, vocab: int = 151_936) -> tuple[float, float]:
    """(vision tower, language model) FLOPs of one forward over one image of `patches` patches, `text` text and
    `response` response tokens (LM head on the response only)."""
    d, h = sizes["vision_dim"], sizes["hidden"]
    vision = sizes["vision_depth"] * (2 * patches * 12 * d * d + 4 * patches * patches * d)  # blocks: matmuls + attention
    vision += 2 * patches * 1176 * d + 2 * (patches // 4) * (4 * d * 4 * d + 4 * d * h)  # patch embedding + merger
    tokens = patches // 4 + text + response
    kv = h // sizes["heads"] * sizes["kv_heads"]
    per_layer = 2 * tokens * (2 * h * h + 2 * h * kv + 3 * h * sizes["intermediate"]) + 2 * tokens * tokens * h
    return vision, sizes["layers"] * per_layer + 2 * response * h * vocab


def response_length(prompts, completions, **kwargs):
    """A rule reward: characters in the completion."""
    return [float(len(c)) for c in completions]


def ppo_trainer(model_dir: Path, root: Path, samples: list[dict], batch: int, response: int, epochs: int,
                device: str = "cpu", bf16: bool = False, **overrides):
    """A PPOTrainer as `vlm-rl ppo` builds it (policy and reference from `model_dir`, the rule reward above):
    `batch` prompts per iteration in micro-batches of batch / 2, scored in one micro-batch."""
    from reward_models.registry import load_rewards
    from vlm_rl.training.config import PPOConfig
    from vlm_rl.data.formats import PromptDataset
    from vlm_rl.models.loading import load_policy_and_reference, load_processor
    from vlm_rl.training.trainer import PPOTrainer

    settings = dict(
        output_dir=str(root / "run"), model_name_or_path=str(model_dir), use_cpu=device == "cpu", bf16=bf16,
        report_to="none", seed=0, disable_tqdm=True, per_device_train_batch_size=max(1, batch // 2),
        gradient_accumulation_steps=2 if batch > 1 else 1, local_rollout_forward_batch_size=batch, num_ppo_epochs=epochs,
        max_new_tokens=response, max_prompt_length=4096, learning_rate=1e-6, total_episodes=batch * 100,
    )
    config = PPOConfig(**{**settings, **overrides})
    policy, reference = load_policy_and_reference(config)
    return PPOTrainer(
        args=config, processing_class=load_processor(str(model_dir)), model=policy, ref_model=reference,
        reward=load_rewards([response_length]), train_dataset=PromptDataset(samples, root),
    )


def prepare(trainer):
    """The part of `train()` before its loop that a benchmark driving iterations by hand needs."""
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.num_total_batches)
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped.eval()
    return trainer


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn, *args, **kwargs):
    """(fn's result, wall seconds, CPU seconds of this process) of one call. On a machine other processes load, the
    CPU seconds of a one-thread run follow the work done; the wall seconds follow the load as well."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    return _status_mib("VmRSS")


# glibc returns an allocation of at least this many bytes to the system when it is freed (its own mmap), so that the
# peak resident memory follows the peak of live tensors, as a GPU's max_memory_allocated does. By default glibc keeps
# freed memory for reuse, and the peak then depends on the order of allocations as much as on what is alive.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def in_subprocess(script: str, *args: str) -> dict:
    """Run `script` (a benchmark in this directory) with `args` in a fresh Python process, which prints one JSON
    line last: for peak-memory figures that an earlier measurement in the same process cannot inflate."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **MALLOC_ENV},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_json(path: str | None, figures: dict) -> None:
    """The benchmark's headline figures to `path` (with the machine they ran on), when `--json PATH` was given."""
    if not path:
        return
    import platform

    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    Path(path).write_text(json.dumps({**figures, "machine": machine}, indent=2) + "\n")
    print(f"  wrote {path}")
