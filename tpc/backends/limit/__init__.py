"""Infinite width: the Master Theorem limit of a program."""

from tpc.backends.limit.evaluate import LimitOutput, evaluate_limit

__all__ = ["LimitOutput", "evaluate_limit"]
