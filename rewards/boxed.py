r"""MATH rewards: the completion's last ``\boxed{…}`` answer, checked against the gold answer with math-verify.

``boxed_accuracy`` takes the content of the last ``\boxed{}`` (braces matched, so ``\boxed{\frac{1}{2}}`` is whole),
wraps it and the gold in ``$…$`` and lets math-verify parse and compare them symbolically and numerically
(``\frac{1}{2}`` = ``0.5``, ``5\text{ cm}`` = ``5``, ``(3,\pi/2)`` = ``\left( 3, \frac{\pi}{2} \right)``). No box
scores 0; of several boxes the last one counts. The content is extracted first because math-verify does not read
answers out of arbitrary text by itself; its own timeouts use ``signal.alarm``, which only works on a main thread, so
they are off here: the job runs this reward in a process pool whose per-call timeout bounds it
(``task.reward_timeout_s``).

``boxed_format`` gives 1 when the completion holds a non-blank ``\boxed{}`` with some reasoning before it.
"""

from __future__ import annotations

import functools
import logging

from math_verify import parse, verify  # ~1 s to import (sympy): at import, outside the pool's per-call timeout

BOX_COMMANDS = ("\\boxed", "\\fbox")
MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers, and would only cost the parser time

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that its timeouts are off


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}`` (or ``\fbox{…}``, or ``\boxed 5``) in ``text``; None if there is none or
    its braces never close."""
    start, command = max((text.rfind(c), c) for c in BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(command)
    if text.startswith(" ", i):  # `\boxed 5`: the next word
        word = text[i + 1:].split(maxsplit=1)
        return word[0].rstrip("$.") if word else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


@functools.lru_cache(maxsize=4096)
def _parse(answer: str):
    return parse(f"${answer}$", parsing_timeout=None)


def boxed_accuracy(completion: str, gold: str) -> float:
    r"""1.0 if the last ``\boxed{}`` of ``completion`` equals ``gold`` (math-verify), else 0.0."""
    answer = last_boxed(completion)
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    expected, got = _parse(gold.strip()), _parse(answer.strip())
    if not expected or not got:
        return 0.0
    return 1.0 if verify(expected, got, timeout_seconds=None) else 0.0


def boxed_format(completion: str) -> float:
    r"""1.0 if ``completion`` has a non-blank ``\boxed{}`` answer with non-blank text before it, else 0.0."""
    answer = last_boxed(completion)
    if answer is None or not answer.strip():
        return 0.0
    start = max(completion.rfind(c) for c in BOX_COMMANDS)
    return 1.0 if completion[:start].strip(" \t\n$") else 0.0
