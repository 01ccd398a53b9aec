"""The PPO trainer and its runtime: config, the loop, checkpoints, preemption, metrics, console, logging integrations."""
