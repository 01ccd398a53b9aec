"""Batched rollouts (one left-padded generate per batch) vs one generate per sample.

    python benchmarks/rollout_batching.py [--batch 32] [--max-new-tokens 16] [--json PATH]
    python benchmarks/rollout_batching.py --size 2b --device cuda --bf16     # on a GPU: a 2B-sized random Qwen2-VL
"""

import argparse

import torch
from _common import SIZES, best_of, model_setup, write_json

from vlm_rl.rollout.generation import generate_responses, make_generation_config
from vlm_rl.data.prompts import encode_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--size", choices=["tiny", *sorted(SIZES)], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the headline figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, samples = model_setup(args.size, args.batch, args.device, args.bf16)
    samples = samples[: args.batch]
    # min_new_tokens keeps every row generating to the end, so both ways produce the same number of tokens
    config = make_generation_config(processor.tokenizer, args.max_new_tokens)
    config.min_new_tokens = args.max_new_tokens

    def generate(batch):
        inputs = {k: v.to(args.device) for k, v in encode_prompts(processor, batch).items() if k != "num_images"}
        generate_responses(model, inputs, config).tolist()  # to the host: every step has finished

    def batched():
        generate(samples)

    def one_at_a_time():
        for s in samples:
            generate([s])

    t_batched = best_of(batched)
    t_single = best_of(one_at_a_time)
    tokens = args.batch * args.max_new_tokens
    print(f"{args.batch} prompts x {args.max_new_tokens} new tokens, Qwen2-VL size {args.size!r}, {args.device}, {args.threads} thread(s)")
    print(f"  batched generate:      {t_batched:.3f} s  ({tokens / t_batched:,.0f} tokens/s)")
    print(f"  one sample at a time:  {t_single:.3f} s  ({tokens / t_single:,.0f} tokens/s)")
    print(f"  speed-up (ours / naive): {t_single / t_batched:.1f}x")
    write_json(args.json, {
        f"speedup_batch{args.batch}": round(t_single / t_batched, 2), "seconds": {"batched": round(t_batched, 3), "one_at_a_time": round(t_single, 3)},
        "max_new_tokens": args.max_new_tokens, "threads": args.threads,
    })


if __name__ == "__main__":
    main()
