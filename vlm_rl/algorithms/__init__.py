"""The RL math as pure tensor functions (advantages, losses, masking): no model, trainer or data code."""
