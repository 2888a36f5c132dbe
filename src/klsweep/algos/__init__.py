"""Algorithms by name, as the ``algo`` config group chooses them."""

from klsweep.algos.dpo import DPO
from klsweep.algos.grpo import GRPO
from klsweep.algos.ppo import PPO

ALGORITHMS = {"grpo": GRPO, "ppo": PPO, "dpo": DPO}

__all__ = ["ALGORITHMS", "DPO", "GRPO", "PPO"]
