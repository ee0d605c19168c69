"""Toy reward for integration tests: easy for a tiny random model to learn.

``digit_fraction_reward`` scores the fraction of a completion's non-whitespace characters that are
ASCII digits, so a policy improves simply by emitting more digits. The gold answer is ignored.
"""

from __future__ import annotations

_DIGITS = "0123456789"


def digit_fraction_reward(completion: str, gold: str) -> float:
    """Fraction of non-whitespace characters of ``completion`` that are ASCII digits (0.0 if none)."""
    non_space = len("".join(completion.split()))
    if non_space == 0:
        return 0.0
    digits = sum(completion.count(d) for d in _DIGITS)
    return digits / non_space
