r"""Reward functions by name, and their weighted combination.

Every reward is a pure function ``(completion, gold) -> float``. Built in: ``"accuracy"`` and
``"format"`` (GSM8K, see ``rewards.gsm8k``), ``"math_accuracy"`` and ``"math_format"`` (the ``\boxed{}``
answers of MATH, see ``rewards.boxed``) and ``"digits"`` (toy task, see ``rewards.toy``). New rewards plug in
with ``@register("name")``; ``WeightedReward({"accuracy": 1.0, "format": 0.2})`` combines them in-process.

The job scores with ``Scorer``: built-ins run inline, while user code named in the config (``task.functions``) and
built-ins registered ``pooled`` (they call a library that may be slow on odd input) run in a process pool with a
per-call timeout (``rewards.pool``).
"""

from __future__ import annotations

import math
from typing import Callable

from rewards import boxed, gsm8k, toy
from rewards.pool import RewardFailed, RewardPool, load_function

RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {}
POOLED: set[str] = set()  # built-ins the job runs in the reward pool


class UnknownRewardError(KeyError, ValueError):
    """No reward is registered under this name (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(name: str, pooled: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a ``(completion, gold) -> float`` function under ``name``; ``pooled``: the job runs it
    in the reward pool (it must then be a module-level function)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        if pooled:
            POOLED.add(name)
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
register("math_accuracy", pooled=True)(boxed.boxed_accuracy)


@register("format")
def _format(completion: str, gold: str) -> float:
    """``gsm8k.format_reward`` with the registry's signature (the gold answer is not used)."""
    return gsm8k.format_reward(completion)


@register("math_format")
def _math_format(completion: str, gold: str) -> float:
    """``boxed.boxed_format`` with the registry's signature (the gold answer is not used)."""
    return boxed.boxed_format(completion)


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


class Scorer:
    """A task's rewards over a batch: the weighted total, each weighted reward's raw score (``reward/<name>``), and
    the task's correctness (``accuracy``) and form (``format_rate``), which may be rewards of weight 0. Built-ins run
    inline; ``functions`` (name → spec) and pooled built-ins run in a ``RewardPool``. Call ``close()`` at the end."""

    def __init__(self, weights: dict[str, float], functions: dict[str, str] | None = None,
                 accuracy: str = "accuracy", format: str | None = "format", workers: int = 2,
                 timeout_s: float = 10.0, max_failures: int = 20) -> None:
        functions = functions or {}
        self.weights, self.accuracy, self.format = {n: float(w) for n, w in weights.items()}, accuracy, format
        self.names = list(dict.fromkeys([*weights, accuracy, *([format] if format else [])]))
        pooled = {}
        for name in self.names:
            if name in functions:
                pooled[name] = functions[name]
            elif name in POOLED:
                fn = get_reward(name)
                pooled[name] = f"{fn.__module__}:{fn.__qualname__}"
        self.inline = {name: get_reward(name) for name in self.names if name not in pooled}  # raises if unknown
        self.pool = RewardPool(pooled, workers, timeout_s, max_failures) if pooled else None

    def scores(self, completions: list[str], golds: list[str], rows: list[dict] | None = None
               ) -> dict[str, list[float]]:
        """Raw scores of every reward the task names, for parallel lists of completions, golds and row fields."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        rows = rows if rows is not None else [{} for _ in completions]
        out = {}
        for name in self.names:
            if name in self.inline:
                fn = self.inline[name]
                out[name] = [fn(c, g) for c, g in zip(completions, golds)]
            else:
                out[name] = self.pool.score(name, completions, golds, rows)
        return out

    def score_batch(self, completions: list[str], golds: list[str], rows: list[dict] | None = None
                    ) -> tuple[list[float], dict[str, list[float]]]:
        """Totals and details: ``reward/<name>`` per weighted reward, ``accuracy`` and ``format_rate``."""
        raw = self.scores(completions, golds, rows)
        totals = [sum(w * raw[n][i] for n, w in self.weights.items()) for i in range(len(completions))]
        details = {f"reward/{n}": raw[n] for n in self.weights}
        details["accuracy"] = raw[self.accuracy]
        if self.format:
            details["format_rate"] = raw[self.format]
        return totals, details

    def failures(self) -> dict[str, int]:
        """Failed calls per pooled reward over the run (``reward_failures/<name>``)."""
        return {f"reward_failures/{n}": c for n, c in self.pool.failures.items()} if self.pool else {}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def check_functions(functions: dict[str, str]) -> None:
    """Load every user reward once, so that a wrong path or name fails before any actor starts."""
    for name, spec in functions.items():
        try:
            load_function(spec)
        except Exception as err:  # noqa: BLE001 - importing user code can raise anything
            raise ValueError(f"task.functions.{name}: {err}") from err


__all__ = ["POOLED", "REWARDS", "RewardFailed", "RewardFn", "Scorer", "UnknownRewardError", "WeightedReward",
           "check_functions", "get_reward", "register"]
