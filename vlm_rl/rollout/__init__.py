"""Rollouts: generation config and batched generate, the Rollout batch, per-token logprobs, input integrity checks."""
