"""Why the tiny configs set torch_num_threads: 1: a PPO-sized forward+backward with 1 vs 2 intra-op threads.

On small VMs, waking a second OpenMP thread for each tiny matmul costs far more than the matmul.

    python benchmarks/cpu_threads.py
"""

import torch
from _common import best_of, model_setup

from vlm_rl.data.prompts import encode_prompts


def main() -> None:
    model, processor, samples = model_setup("tiny", 16)
    inputs = {k: v for k, v in encode_prompts(processor, samples[:16]).items() if k != "num_images"}

    def step():
        model.zero_grad()
        model(**inputs).logits.float().mean().backward()

    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        step()  # warm-up
        results[threads] = best_of(step, repeats=5)
        print(f"  {threads} thread(s): {results[threads] * 1e3:.1f} ms per forward+backward (batch 16)")
    print(f"  speed-up of 1 thread over 2: {results[2] / results[1]:.1f}x")


if __name__ == "__main__":
    main()
