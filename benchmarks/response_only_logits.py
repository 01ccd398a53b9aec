"""LM head on response positions only vs the naive full-sequence logits, at Qwen2-VL-2B's vocabulary size.

The prompt of a VLM holds hundreds of image tokens; their logits over 151,936 words are never needed for
PPO. This runs the tiny model's backbone with a real-size LM head (random weights) and compares the two
ways of getting response logprobs: time and the size of the logits tensor.

    python benchmarks/response_only_logits.py [--batch 8] [--response 32]
"""

import argparse

import torch
from _common import best_of, tiny_setup
from trl.trainer.utils import selective_log_softmax

from vlm_rl.logprobs import response_hidden_states
from vlm_rl.rollout import Rollout, encode_prompts

QWEN2_VL_VOCAB = 151_936


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, samples = tiny_setup(args.batch)
    hidden_size = model.config.text_config.hidden_size
    lm_head = torch.nn.Linear(hidden_size, QWEN2_VL_VOCAB, bias=False)
    query = encode_prompts(processor, samples[: args.batch])
    responses = torch.randint(0, 400, (args.batch, args.response))
    rollout = Rollout.from_generation(query, responses, [10**9], 0, ["s"] * args.batch)
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

    assert torch.allclose(ours(), naive(), atol=1e-4)
    t_ours, t_naive = best_of(ours), best_of(naive)
    bytes_ours = args.batch * args.response * QWEN2_VL_VOCAB * 4
    bytes_naive = args.batch * (t_q + args.response) * QWEN2_VL_VOCAB * 4
    print(f"batch {args.batch}, prompt {t_q} tokens (image tokens included), response {args.response}, vocab {QWEN2_VL_VOCAB:,}")
    print(f"  response-only LM head: {t_ours:.3f} s, fp32 logits {bytes_ours / 2**20:,.0f} MiB")
    print(f"  full-sequence logits:  {t_naive:.3f} s, fp32 logits {bytes_naive / 2**20:,.0f} MiB (+ as much again for log_softmax)")
    print(f"  speed-up: {t_naive / t_ours:.1f}x   logits memory ratio (naive / ours): {bytes_naive / bytes_ours:.1f}x")


if __name__ == "__main__":
    main()
