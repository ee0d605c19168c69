"""GSM8K rewards: exact-answer accuracy and answer-tag format, as pure functions on strings.

A completion is expected to end with its reasoning followed by ``<answer>NUMBER</answer>``.

Accuracy looks at the content of the last complete ``<answer>…</answer>`` pair and compares it with
the gold answer numerically, with exact decimal arithmetic (``72`` = ``72.0`` = ``$72``). Before
comparing, the content is normalised: surrounding whitespace, one ``$`` sign, thousands commas in a
well-formed grouping (``1,234,567``; ``1,00`` is not a number) and one trailing period (``72.``) are
removed. After that it must be exactly one number: content such as ``70 71 72`` or ``72 or 73``
scores 0, so that a policy cannot collect credit by listing candidates, and so does any other text
(``72 apples``, ``x = 72``).

Format gives 1 when the completion ends (up to trailing whitespace) with an answer pair holding
non-blank content and some non-blank reasoning stands before the opening tag.

Both rewards never raise on a ``str``, keep no shared mutable state and run in time linear in the
completion: tags are found with ``str.rfind`` and the only regex is a simple anchored match on
content no longer than ``MAX_NUMBER_CHARS``.
"""

from __future__ import annotations

import re
from decimal import Decimal

OPEN_TAG = "<answer>"
CLOSE_TAG = "</answer>"
GOLD_MARKER = "####"
MAX_NUMBER_CHARS = 100  # longer content cannot be a single number we care about

# Unsigned ASCII number: well-formed thousands grouping or plain digits, optional decimal part.
_NUMBER = re.compile(r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?P<frac>\.[0-9]+)?")


def normalise_number(text: str) -> str | None:
    """Return ``text`` as a canonical number string (``"-1234.5"``), or None if it is not one number.

    Accepted: surrounding whitespace, a trailing period, a ``$`` before or after a leading ``-``
    (``$-5``, ``-$5``), thousands commas in a valid grouping. Anything else gives None.
    """
    s = text.strip()
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    if s.endswith("."):
        s = s[:-1]
    dollar = s.startswith("$")
    if dollar:
        s = s[1:]
    sign = ""
    if s.startswith("-"):
        sign, s = "-", s[1:]
    if not dollar and s.startswith("$"):
        s = s[1:]
    m = _NUMBER.fullmatch(s)
    if m is None:
        return None
    return sign + m.group("int").replace(",", "") + (m.group("frac") or "")


def extract_gold(raw_answer: str) -> str:
    """Gold number from a GSM8K ``answer`` field (the text after its last ``####``).

    Returns the number with ``$`` and thousands commas removed (``"#### 1,000"`` -> ``"1000"``).
    Raises ValueError when there is no ``####`` or what follows it is not a single number.
    """
    head, marker, tail = raw_answer.rpartition(GOLD_MARKER)
    if not marker:
        raise ValueError(f"GSM8K answer has no {GOLD_MARKER!r} marker: {raw_answer[-80:]!r}")
    gold = normalise_number(tail)
    if gold is None:
        raise ValueError(f"GSM8K gold after {GOLD_MARKER!r} is not a single number: {tail.strip()[:80]!r}")
    return gold


def last_answer(completion: str) -> str | None:
    """Content of the last complete ``<answer>…</answer>`` pair, or None if there is none."""
    end = completion.rfind(CLOSE_TAG)
    if end < 0:
        return None
    start = completion.rfind(OPEN_TAG, 0, end)
    if start < 0:
        return None
    return completion[start + len(OPEN_TAG) : end]


def accuracy_reward(completion: str, gold: str) -> float:
    """1.0 if the last answer pair holds exactly one number equal to ``gold``, else 0.0."""
    content = last_answer(completion)
    if content is None:
        return 0.0
    answer = normalise_number(content)
    expected = normalise_number(gold)
    if answer is None or expected is None:
        return 0.0
    return 1.0 if Decimal(answer) == Decimal(expected) else 0.0


def format_reward(completion: str) -> float:
    """1.0 if the completion is ``reasoning <answer>content</answer>`` plus trailing whitespace, else 0.0.

    Both reasoning and content must hold non-whitespace text (either may span several lines) and
    the content must not hold another answer tag.
    """
    s = completion.rstrip()
    if not s.endswith(CLOSE_TAG):
        return 0.0
    end = len(s) - len(CLOSE_TAG)
    start = s.rfind(OPEN_TAG, 0, end)
    if start < 0:
        return 0.0
    content = s[start + len(OPEN_TAG) : end]
    if not content.strip() or CLOSE_TAG in content:
        return 0.0
    return 1.0 if s[:start].strip() else 0.0
