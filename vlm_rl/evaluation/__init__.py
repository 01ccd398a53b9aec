"""Evaluation commands: generate, score, compare, and the statistics and report behind compare."""
