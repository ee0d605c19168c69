"""This engine process's work, counted: one tick per engine step (`core.patches.count_engine_steps`) and per weight
bucket received (`rollout.worker_extension`). The engine's probe (`RolloutEngine.progress`) reads it from its own
thread while a call runs; the driver calls an engine whose count stops moving hung (`rollout.group.StallWatch`)."""
from __future__ import annotations

_ticks = 0


def tick() -> None:
    global _ticks
    _ticks += 1


def ticks() -> int:
    return _ticks
