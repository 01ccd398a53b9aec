"""LM head on response positions only vs the naive full-sequence logits, at Qwen2-VL-2B's vocabulary size.

The prompt of a VLM holds hundreds to thousands of image tokens; their logits over 151,936 words are never needed
for PPO. This runs a Qwen2-VL backbone (the tiny one by default) with a real-size LM head (random weights) on a
long, image-heavy prompt (one 896 x 896 image: 1,024 vision tokens) and compares the two ways of getting response
logprobs: time, and the peak memory of the computation (each way in a fresh process: peak resident memory over
the resident memory before it; on a GPU, torch.cuda.max_memory_allocated).

    python benchmarks/response_only_logits.py [--batch 4] [--response 32] [--image-side 896] [--json PATH]
    python benchmarks/response_only_logits.py --size 2b --device cuda --bf16         # on a GPU
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import SIZES, best_of, in_subprocess, model_setup, peak_rss_mib, rss_mib, write_json
from trl.trainer.utils import selective_log_softmax

from vlm_rl.models.families import family_of
from vlm_rl.rollout.logprobs import response_hidden_states
from vlm_rl.rollout.batch import Rollout
from vlm_rl.data.prompts import encode_prompts

QWEN2_VL_VOCAB = 151_936


def measure(args) -> dict:
    """Time and peak memory of one way (`args.measure`: "ours" or "naive") in this process."""
    model, processor, samples = model_setup(args.size, args.batch, args.device, args.bf16, args.image_side)
    hidden_size = model.config.text_config.hidden_size
    torch.manual_seed(0)  # the same LM head and responses in both processes
    lm_head = torch.nn.Linear(hidden_size, QWEN2_VL_VOCAB, bias=False, dtype=model.dtype, device=args.device)
    query = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in encode_prompts(processor, samples[: args.batch]).items()}
    responses = torch.randint(0, 400, (args.batch, args.response), device=args.device)
    rollout = Rollout.from_generation(query, responses, [10**9], 0, ["s"] * args.batch, family_of(model))
    t_q = rollout.context_length

    @torch.no_grad()
    def ours():
        hidden = response_hidden_states(model, rollout, "bench")  # (B, T_r, H)
        return selective_log_softmax(lm_head(hidden).float(), rollout.responses)

    @torch.no_grad()
    def naive():
        hidden = model.model(**rollout.model_inputs()).last_hidden_state  # (B, T_q + T_r, H)
        logits = lm_head(hidden).float()  # (B, T_q + T_r, V): every prompt and image position
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs[:, t_q - 1 : -1].gather(-1, rollout.responses[..., None])[..., 0]

    fn = ours if args.measure == "ours" else naive
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()) - before
    seconds = best_of(lambda: fn().sum().item())
    return {"peak_mib": peak, "seconds": seconds, "prompt_tokens": t_q, "checksum": float(result.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", *sorted(SIZES)], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--image-side", type=int, default=896, help="pixels; 896 gives 1,024 vision tokens per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (the log-softmax stays fp32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the headline figures to this file")
    parser.add_argument("--measure", choices=["ours", "naive"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    common = ["--size", args.size, "--batch", str(args.batch), "--response", str(args.response), "--image-side",
              str(args.image_side), "--device", args.device, "--threads", str(args.threads)] + (["--bf16"] if args.bf16 else [])
    ours, naive = (in_subprocess("response_only_logits.py", "--measure", way, *common) for way in ("ours", "naive"))
    # the same logprobs both ways (random weights: a loose bound for the order of summation)
    assert abs(ours["checksum"] - naive["checksum"]) <= 1e-4 * max(1.0, abs(naive["checksum"])), (ours["checksum"], naive["checksum"])
    t_q = ours["prompt_tokens"]
    logits_ours = args.batch * args.response * QWEN2_VL_VOCAB * 4 / 2**20
    logits_naive = args.batch * (t_q + args.response) * QWEN2_VL_VOCAB * 4 / 2**20
    print(f"batch {args.batch}, prompt {t_q} tokens (one {args.image_side}x{args.image_side} image), response {args.response}, "
          f"vocab {QWEN2_VL_VOCAB:,}, Qwen2-VL size {args.size!r}, {args.device}")
    print(f"  {'':<28}{'seconds':>9}{'peak MiB':>10}{'fp32 logits MiB':>17}")
    print(f"  {'response-only LM head':<28}{ours['seconds']:>9.3f}{ours['peak_mib']:>10,.0f}{logits_ours:>17,.0f}")
    print(f"  {'full-sequence logits':<28}{naive['seconds']:>9.3f}{naive['peak_mib']:>10,.0f}{logits_naive:>17,.0f}")
    ratio = ours["peak_mib"] / naive["peak_mib"]
    print(f"  speed-up: {naive['seconds'] / ours['seconds']:.1f}x   peak memory, ours / naive: {ratio:.3f}")
    write_json(args.json, {
        "memory_ratio": round(ratio, 4), "speedup": round(naive["seconds"] / ours["seconds"], 2),
        "peak_mib": {"ours": round(ours["peak_mib"], 1), "naive": round(naive["peak_mib"], 1)},
        "prompt_tokens": t_q, "batch": args.batch, "response": args.response, "size": args.size, "device": args.device,
    })


if __name__ == "__main__":
    main()
