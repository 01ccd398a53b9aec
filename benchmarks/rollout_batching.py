"""Batched rollouts (one left-padded generate per batch) vs one generate per sample.

    python benchmarks/rollout_batching.py [--batch 32] [--max-new-tokens 16]
"""

import argparse

import torch
from _common import best_of, tiny_setup

from vlm_rl.generation import generate_responses, make_generation_config
from vlm_rl.rollout import encode_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, samples = tiny_setup(args.batch)
    samples = samples[: args.batch]
    # min_new_tokens keeps every row generating to the end, so both ways produce the same number of tokens
    config = make_generation_config(processor.tokenizer, args.max_new_tokens)
    config.min_new_tokens = args.max_new_tokens

    def batched():
        inputs = {k: v for k, v in encode_prompts(processor, samples).items() if k != "num_images"}
        generate_responses(model, inputs, config)

    def one_at_a_time():
        for s in samples:
            inputs = {k: v for k, v in encode_prompts(processor, [s]).items() if k != "num_images"}
            generate_responses(model, inputs, config)

    t_batched = best_of(batched)
    t_single = best_of(one_at_a_time)
    tokens = args.batch * args.max_new_tokens
    print(f"{args.batch} prompts x {args.max_new_tokens} new tokens, tiny Qwen2-VL, {args.threads} thread(s)")
    print(f"  batched generate:      {t_batched:.3f} s  ({tokens / t_batched:,.0f} tokens/s)")
    print(f"  one sample at a time:  {t_single:.3f} s  ({tokens / t_single:,.0f} tokens/s)")
    print(f"  speed-up (ours / naive): {t_single / t_batched:.1f}x")


if __name__ == "__main__":
    main()
