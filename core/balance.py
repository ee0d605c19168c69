"""Splitting work into parts of near-equal cost: prompts over engines, samples over learner ranks."""
from __future__ import annotations

import heapq


def split_balanced(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of `costs` in `parts` groups with near-equal total cost (longest first onto the lightest part)."""
    heap = [(0, p) for p in range(parts)]
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        load, p = heapq.heappop(heap)
        groups[p].append(i)
        heapq.heappush(heap, (load + costs[i], p))
    return [sorted(g) for g in groups]
