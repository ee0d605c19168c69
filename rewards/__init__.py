"""Reward functions by name, and their weighted combination.

Every reward is a pure function ``(completion, gold) -> float``. Built in: ``"accuracy"`` and
``"format"`` (GSM8K, see ``rewards.gsm8k``) and ``"digits"`` (toy task, see ``rewards.toy``). New
rewards plug in with ``@register("name")``; a run combines them with ``WeightedReward``, e.g.
``WeightedReward({"accuracy": 1.0, "format": 0.2})``.
"""

from __future__ import annotations

import math
from typing import Callable

from rewards import gsm8k, toy

RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {}


class UnknownRewardError(KeyError, ValueError):
    """No reward is registered under this name (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a ``(completion, gold) -> float`` function under ``name``."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``."""
    try:
        return REWARDS[name]
    except KeyError:
        raise UnknownRewardError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}") from None


register("accuracy")(gsm8k.accuracy_reward)
register("digits")(toy.digit_fraction_reward)


@register("format")
def _format(completion: str, gold: str) -> float:
    """``gsm8k.format_reward`` with the registry's signature (the gold answer is not used)."""
    return gsm8k.format_reward(completion)


class WeightedReward:
    """Sum of named rewards times their weights; also reports each raw score."""

    def __init__(self, weights: dict[str, float]) -> None:
        if not weights:
            raise ValueError(f"no rewards given; known rewards: {sorted(REWARDS)}")
        for name, weight in weights.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of reward {name!r} must be a finite number >= 0, got {weight!r}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.fns = {name: get_reward(name) for name in self.weights}

    def __call__(self, completion: str, gold: str) -> tuple[float, dict[str, float]]:
        """``(total, {name: raw score})`` for one completion."""
        scores = {name: fn(completion, gold) for name, fn in self.fns.items()}
        return sum(self.weights[n] * s for n, s in scores.items()), scores

    def score_batch(self, completions: list[str], golds: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """Totals and per-reward raw scores for parallel lists of completions and golds."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        totals: list[float] = []
        per_name: dict[str, list[float]] = {name: [] for name in self.fns}
        for completion, gold in zip(completions, golds):
            total, scores = self(completion, gold)
            totals.append(total)
            for name, score in scores.items():
                per_name[name].append(score)
        return totals, per_name


__all__ = ["REWARDS", "RewardFn", "UnknownRewardError", "WeightedReward", "get_reward", "register"]
