"""PPOTrainer's optimiser and schedule: the policy's and the critic's parameters in groups of their own (the critic
at `critic_learning_rate`), and the policy's schedule held back through the critic warm-up."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from vlm_rl.errors import ConfigError


class OptimisersMixin:
    """transformers' `create_optimizer`/`create_scheduler` for PPOTrainer (a transformers Trainer whose `model` is
    PolicyAndValue, with `retarget_learning_rate` from the checkpointing mixin)."""

    @property
    def critic_learning_rate(self) -> float:
        return self.args.critic_learning_rate or self.args.learning_rate

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """transformers' optimizer (its weight-decay groups), each group split into the policy's parameters and the
        critic's (marked `critic: True`), which train at `critic_learning_rate`."""
        optimizer = super().create_optimizer(model)
        critic = {id(p) for n, p in self.model.named_parameters() if n in self.model.critic_parameter_names()}
        groups, optimizer.param_groups = optimizer.param_groups, []
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for is_critic in (False, True):
                params = [p for p in group["params"] if (id(p) in critic) == is_critic]
                if params:
                    lr = self.critic_learning_rate if is_critic else group["lr"]
                    optimizer.add_param_group({**settings, "params": params, "lr": lr, "critic": is_critic})
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' schedule (`lr_scheduler_type`, its warm-up and kwargs) over the run for the critic's groups;
        the policy's groups run the same schedule over the iterations that train the policy, from the end of the
        critic warm-up (as OpenRLHF's freezing_actor_steps skips the actor's scheduler step)."""
        warmup = self.args.critic_warmup_steps
        if self.lr_scheduler is not None or not warmup:
            return super().create_scheduler(num_training_steps, optimizer)
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        policy_steps = max(num_training_steps - warmup, 1)
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only its schedule's multiplier is used
        policy_schedule = get_scheduler(
            self.args.lr_scheduler_type, optimizer=probe, num_warmup_steps=self.args.get_warmup_steps(policy_steps),
            num_training_steps=policy_steps, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )  # fmt: skip
        if not hasattr(scheduler, "lr_lambdas") or not hasattr(policy_schedule, "lr_lambdas"):
            raise ConfigError(f"critic_warmup_steps needs a schedule of step-wise multipliers; lr_scheduler_type={self.args.lr_scheduler_type} is not one")
        multiplier = policy_schedule.lr_lambdas[0]

        def policy_multiplier(step: int) -> float:  # (a plain function: the scheduler's state_dict leaves it out)
            return multiplier(max(step - warmup, 0))

        groups = self.optimizer.param_groups
        scheduler.lr_lambdas = [f if group.get("critic") else policy_multiplier for f, group in zip(scheduler.lr_lambdas, groups)]
        self.retarget_learning_rate()
        return scheduler

    def policy_learning_rate(self) -> float:
        """The policy's learning rate now (its first parameter group's)."""
        return next(group["lr"] for group in self.optimizer.param_groups if not group.get("critic"))
