"""Algorithms by name, as the ``algo`` config group chooses them."""

from klsweep.algos.grpo import GRPO

ALGORITHMS = {"grpo": GRPO}

__all__ = ["ALGORITHMS", "GRPO"]
