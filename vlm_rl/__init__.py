"""vlm-rl: PPO/RLHF for vision-language models. Importing it silences the library warnings a user cannot act on."""

from vlm_rl import quiet  # noqa: F401  (filters, vlm_rl/quiet.py)
