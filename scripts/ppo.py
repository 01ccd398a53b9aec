"""PPO for Qwen2-VL. `accelerate launch scripts/ppo.py --config configs/ppo_tiny.yaml [--flag value ...]`"""

from vlm_rl.ppo import main

if __name__ == "__main__":
    main()
