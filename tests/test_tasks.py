"""Tasks from config: MATH's boxed-answer reward (hand cases), user rewards loaded from files and run in the reward
pool (timeouts, exceptions, crashed processes, K failures in a row), field mapping of datasets, eval numbers
(pass@k / mean@k) and the config rules around them. Pure functions and real processes; no actors."""
import json
import os
import re
import time

import pytest

from core.types import Sample
from launch.batch import eval_numbers, load_eval_sets, load_train, score
from launch.config import ConfigError, Fields, load_config
from launch.data import Example, gold_of, load_examples, parse_rows, split_holdout
from rewards import RewardFailed, Scorer, check_functions
from rewards.boxed import boxed_accuracy, boxed_format, last_boxed
from rewards.pool import RewardPool, load_function


# ---- MATH: \boxed{} answers with math-verify ----------------------------------------------------------------------

@pytest.mark.parametrize("completion, gold, expected", [
    (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", 1.0),  # nested braces kept whole
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}2", 1.0),
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1.0),  # \frac vs decimal
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"so \boxed{0.51}", r"\frac{1}{2}", 0.0),
    (r"it is \boxed{5\text{ cm}}", "5", 1.0),  # units
    (r"it is \boxed{12 \text{ inches}}", "12", 1.0),
    (r"\boxed{3} no wait, \boxed{4}", "4", 1.0),  # several boxes: the last one counts
    (r"\boxed{4} no wait, \boxed{3}", "4", 0.0),
    (r"\boxed 7 is it", "7", 1.0),  # \boxed without braces takes the next word
    (r"\fbox{7}", "7", 1.0),
    ("the answer is 7", "7", 0.0),  # no box
    (r"\boxed{}", "7", 0.0),
    (r"\boxed{\frac{1}{2}", r"\frac{1}{2}", 0.0),  # braces never close
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{x^2+1}", "1+x^2", 1.0),
    (r"\boxed{" + "1+" * 600 + "1}", "601", 0.0),  # absurdly long content is not parsed
])
def test_boxed_accuracy_hand_cases(completion, gold, expected):
    assert boxed_accuracy(completion, gold) == expected


def test_last_boxed_and_format():
    assert last_boxed(r"a \boxed{x{y}z} b") == "x{y}z" and last_boxed("none") is None
    assert last_boxed(r"\boxed{1} \fbox{2}") == "2" and last_boxed(r"\fbox{1} \boxed{2}") == "2"
    assert boxed_format(r"2 + 2 = 4, so \boxed{4}") == 1.0
    assert boxed_format(r"\boxed{4}") == 0.0  # no reasoning before it
    assert boxed_format(r"so \boxed{ }") == 0.0 and boxed_format("so 4") == 0.0


# ---- user rewards in the pool -------------------------------------------------------------------------------------

USER_REWARD = '''
import os, time

def digits(completion, gold):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)

def with_row(completion, gold, row):
    return float(row["bonus"]) + (completion == gold)

def moody(completion, gold):
    if completion == "sleep":
        time.sleep(30)
    if completion == "raise":
        raise ZeroDivisionError("moody divides by zero")
    if completion == "exit":
        os._exit(3)
    if completion == "text":
        return "1.0"
    return 1.0

def always_raises(completion, gold):
    raise KeyError("no such field in " + completion)

class OwnError(Exception):
    pass

def own_error(completion, gold):
    if completion == "boom":
        raise OwnError("a class the job cannot import")
    if completion == "exit":
        raise SystemExit(0)
    return completion == gold  # a bool counts as 0/1
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_rewards.py"  # outside the repository
    path.write_text(USER_REWARD)
    return path


def test_user_functions_load_by_path_and_module(reward_file):
    assert load_function(f"{reward_file}:digits")("a1", "") == 0.5
    assert load_function("rewards.toy:digit_fraction_reward")("a1", "") == 0.5
    for spec, message in ((f"{reward_file}:nope", "has no function 'nope'"), ("/no/such/file.py:f", "no file"),
                          ("no_such_module_xyz:f", "cannot import"), ("just_a_name", "expected")):
        with pytest.raises(ValueError, match=message):
            check_functions({"r": spec})


def test_pool_scores_with_the_row_and_survives_bad_calls(reward_file):
    pool = RewardPool({"row": f"{reward_file}:with_row", "moody": f"{reward_file}:moody"}, workers=2, timeout_s=1.0,
                      max_failures=10)
    try:
        assert pool.score("row", ["7", "8"], ["7", "7"], [{"bonus": 1}, {"bonus": 2}]) == [2.0, 2.0]
        start = time.time()
        got = pool.score("moody", ["ok", "sleep", "raise", "exit", "text", "ok"], [""] * 6, [{}] * 6)
        assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # failures score 0; the calls around them are scored
        assert time.time() - start < 15  # the sleeper was cut at its 1 s timeout, not waited for (30 s)
        assert pool.failures == {"row": 0, "moody": 4} and pool.in_a_row["moody"] == 0
        assert pool.score("moody", ["ok"] * 3, [""] * 3, [{}] * 3) == [1.0] * 3  # the pool still works after kills
    finally:
        pool.close()


def test_user_exceptions_of_any_class_come_back_as_failures(reward_file):
    """A reward raising its own exception class (which the job's process cannot import) or SystemExit is a counted
    failure with its traceback, not a lost result that hangs the job; workers run in their own session."""
    pool = RewardPool({"own": f"{reward_file}:own_error"}, workers=1, timeout_s=5.0, max_failures=2)
    try:
        start = time.time()
        assert pool.score("own", ["7", "boom", "7", "exit", "8"], ["7"] * 5, [{}] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]
        assert time.time() - start < 20 and pool.failures["own"] == 2
        workers = list(pool._pool._pool_manager.worker_manager.workers.values())
        assert all(os.getsid(w.pid) == w.pid != os.getsid(0) for w in workers)  # out of the job's process group
        with pytest.raises(RewardFailed, match=r"OwnError: a class the job cannot import(.|\n)*own_error"):
            pool.score("own", ["boom", "boom"], ["", ""], [{}, {}])
    finally:
        pool.close()


def test_k_failures_in_a_row_stop_with_the_name_and_traceback(reward_file):
    pool = RewardPool({"bad": f"{reward_file}:always_raises"}, workers=1, timeout_s=5.0, max_failures=3)
    try:
        assert pool.score("bad", ["a", "b"], ["", ""], [{}, {}]) == [0.0, 0.0]  # 2 in a row: counted, go on
        with pytest.raises(RewardFailed) as err:
            pool.score("bad", ["c", "d"], ["", ""], [{}, {}])
        text = str(err.value)
        assert "reward 'bad'" in text and "failed 3 times in a row" in text and "KeyError" in text
        assert "no such field in c" in text and "Traceback" in text and "always_raises" in text
    finally:
        pool.close()
    sleepy = RewardPool({"slow": f"{reward_file}:moody"}, workers=1, timeout_s=0.5, max_failures=2)
    try:
        with pytest.raises(RewardFailed, match="timed out after 0.5s"):
            sleepy.score("slow", ["sleep"] * 4, [""] * 4, [{}] * 4)
    finally:
        sleepy.close()


def test_scorer_runs_user_and_math_rewards_in_the_pool_and_builtins_inline(reward_file):
    scorer = Scorer({"digits": 1.0, "mine": 0.5}, {"mine": f"{reward_file}:digits"}, accuracy="math_accuracy",
                    format="math_format")
    try:
        assert set(scorer.inline) == {"digits", "math_format"} and set(scorer.pool.specs) == {"mine", "math_accuracy"}
        totals, details = scorer.score_batch([r"1+1=2 so \boxed{2}", "no"], ["2", "2"])
        builtin, mine = 4 / 16, 4 / 18  # digits over non-blank characters; the user's over all 18
        assert totals == pytest.approx([builtin + 0.5 * mine, 0.0])
        assert details["accuracy"] == [1.0, 0.0] and details["format_rate"] == [1.0, 0.0]
        assert details["reward/mine"] == pytest.approx([mine, 0.0]) and scorer.failures() == {
            "reward_failures/mine": 0, "reward_failures/math_accuracy": 0}
    finally:
        scorer.close()


# ---- datasets and field mapping -----------------------------------------------------------------------------------

def test_offline_math_with_boxed_gold_and_other_sets():
    math = load_examples("train", "offline:math", Fields(prompt_field="problem", answer_field="solution",
                                                         answer_extract="boxed"))
    assert len(math) == 7498  # 7500 rows; 2 solutions hold no \boxed{} answer: skipped and counted
    assert math[0].gold and "problem" in math[0].fields and "level" in math[0].fields
    svamp = load_examples("test", "offline:svamp", Fields(prompt_field="Body", answer_field="Answer",
                                                          answer_extract="none"))
    assert len(svamp) == 1000 and svamp[0].gold == "145.0"  # a number field, as text
    with pytest.raises(FileNotFoundError, match="no folder 'nope'"):
        load_examples("test", "offline:nope")


def test_field_mapping_messages_and_malformed_rows(tmp_path, caplog):
    rows = [{"chat": [{"role": "user", "content": "1+1?"}], "y": 2},
            {"chat": "not a list", "y": 3},
            {"chat": [{"role": "user", "content": "2+2?"}], "y": None},
            {"chat": [{"role": "user", "content": "3+3?"}], "y": "6", "extra": "kept"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n[1, 2]\n")
    fields = Fields(messages_field="chat", answer_field="y", answer_extract="none")
    with caplog.at_level("WARNING", logger="rlvr.data"):
        examples = load_examples("train", str(path), fields, label="mine")
    assert [(e.idx, e.gold) for e in examples] == [(0, "2"), (3, "6")]
    assert examples[1].question == ({"role": "user", "content": "3+3?"},) and examples[1].fields["extra"] == "kept"
    msg = caplog.records[0].getMessage()
    assert "mine train: 2 rows" in msg and "3 skipped" in msg and "missing or malformed chat/y: 3" in msg
    _, skipped = parse_rows([{"q": "x", "a": "none here"}], Fields(prompt_field="q", answer_field="a",
                                                                  answer_extract="boxed"))
    assert skipped == {"no \\boxed{} answer": 1}


def test_a_question_built_from_two_fields_of_a_row():
    rows = [{"Body": "Ann has 3 apples and gets 4 more.", "Question": "How many apples does she have?", "Answer": 7.0},
            {"Body": "Bo has 9 pens.", "Answer": 9.0},  # lacks Question: skipped and counted, the others kept
            {"Body": 12, "Question": " How many?  ", "Answer": 12}]  # a number field, as text; each field stripped
    fields = Fields(question_template="{Body} {Question}", answer_field="Answer", answer_extract="none")
    examples, skipped = parse_rows(rows, fields)
    assert [e.question for e in examples] == ["Ann has 3 apples and gets 4 more. How many apples does she have?",
                                              "12 How many?"]
    assert [e.gold for e in examples] == ["7.0", "12"] and skipped == {
        "no field 'Question' (named by question_template)": 1}
    svamp = load_examples("test", "offline:svamp", fields)  # the real rows: Body + Question, as SVAMP is meant
    assert len(svamp) == 1000 and svamp[0].question == (
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups and "
        "oranges are organized into 93 groups How big is each group of bananas?") and svamp[0].gold == "145.0"
    with pytest.raises(ValueError, match="names the field 'Questoin', which no row has .*Answer, Body, Question"):
        parse_rows(rows[:1], Fields(question_template="{Body} {Questoin}", answer_field="Answer"))


def test_a_template_naming_a_missing_field_is_a_config_error_naming_it(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config("toy_tiny_cpu.yaml", ["data.source=offline:svamp", "data.question_template={Body} {Qestion}",
                                            "data.answer_field=Answer", "data.answer_extract=none",
                                            "data.train_split=test"])
    with pytest.raises(ConfigError, match="'Qestion', which no row has"):  # exit 2 in the job
        load_train(cfg, tok)
    one = load_config("toy_tiny_cpu.yaml", ["data.question_template={Body}"])  # a YAML set on its own: the text
    assert one.data.question_template == "{Body}"
    for bad, why in [("{Body.x}", "plain field name"), ("{}", "plain field name"), ("{Body!r}", "plain field name"),
                     ("no fields", "names no field"), ("{Body", "expected '}'")]:
        with pytest.raises(ConfigError, match=f"data.question_template.*{re.escape(why)}"):
            load_config("toy_tiny_cpu.yaml", [f"data.question_template='{bad}'"])
        with pytest.raises(ConfigError, match=f"data.question_template.*{re.escape(why) if bad != '{}' else ''}"):
            load_config("toy_tiny_cpu.yaml", [f"data.question_template={bad}"])  # unquoted on a command line
        with pytest.raises(ConfigError, match=f"eval.sets.0.*{re.escape(why)}"):
            load_config("toy_tiny_cpu.yaml", [f"eval.sets=[{{name: s, source: x, question_template: '{bad}'}}]"])


def test_leading_number_gold_and_holdout_split():
    assert [gold_of(v, "number") for v in ("9 (apples)", "1,000 (dollars)", "-3", 12.5)] == ["9", "1000", "-3",
                                                                                            "12.5"]
    for bad in ("3:30 p.m.", "Yes", "5 apples", "4/5 (of a pie)", "", "5 (apples) ; 6 (pears)"):
        with pytest.raises(ValueError):
            gold_of(bad, "number")
    asdiv = load_examples("test", "offline:asdiv", Fields(question_template="{body} {question}",
                                                          answer_field="answer", answer_extract="number"))
    assert len(asdiv) == 2084 and asdiv[0].question == (  # 2215 rows; 131 golds are times, names, yes/no, ratios
        "Seven red apples and two green apples are in the basket. How many apples are in the basket?")
    rows = [Example(i, f"q{i % 40}", str(i)) for i in range(50)]  # q0..q9 appear twice
    train, held = split_holdout(rows, 8)
    assert split_holdout(rows, 8) == (train, held) and len(held) == 8  # a fixed choice
    assert [e.idx for e in held] == sorted(e.idx for e in held)
    assert not {e.question for e in held} & {e.question for e in train}  # a duplicate question is not trained on
    assert len(train) == sum(1 for e in rows if e.question not in {h.question for h in held}) < 42
    with pytest.raises(ValueError, match="leaves no training rows"):
        split_holdout(rows, 50)


def test_an_eval_set_naming_its_prompt_field_does_not_inherit_the_chat_field(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"chat": [{"role": "user", "content": f"{i}+1?"}], "y": str(i + 1)})
                               for i in range(3)) + "\n")
    cfg = load_config("toy_tiny_cpu.yaml", [f"data.source={chats}", "data.chat_template=true",
                                            "data.messages_field=chat", "data.answer_field=y",
                                            "data.answer_extract=none", "eval.num_examples=4",
                                            "eval.sets=[{name: g, source: 'offline:gsm8k', prompt_field: question, "
                                            "answer_field: answer, answer_extract: gsm8k}]"])
    own, gsm8k = load_eval_sets(cfg, AutoTokenizer.from_pretrained(tiny_model))
    assert isinstance(own.examples[0].question, tuple) and len(own.ids) == 3
    assert isinstance(gsm8k.examples[0].question, str) and gsm8k.examples[0].gold == "18" and len(gsm8k.ids) == 4
    bad = load_config("toy_tiny_cpu.yaml", ["data.prompt_field=nope", "eval.num_examples=4"])
    with pytest.raises(ConfigError, match="no usable rows"):  # exit 2 in the job, not a traceback
        load_eval_sets(bad, AutoTokenizer.from_pretrained(tiny_model))


def test_task_config_loads_every_eval_set(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config("math_qwen2.5_0.5b.yaml", [f"model.path={tiny_model}", "eval.num_examples=20"])
    assert cfg.rewards == {"math_accuracy": 1.0, "math_format": 0.1}  # the GSM8K parent's weights are replaced
    train = load_train(cfg, tok)
    sets = load_eval_sets(cfg, tok)
    assert [s.name for s in sets] == ["", "math500", "gsm8k"] and all(0 < len(s.ids) <= 20 for s in sets)
    assert sets[1].examples[0].gold == r"\left( 3, \frac{\pi}{2} \right)" and sets[2].examples[0].gold == "18"
    assert len(train.ids) > 6000


@pytest.mark.parametrize("override, message", [
    ("rewards.mine=1.0", "rewards.mine: unknown reward"),
    ("task.accuracy=nope", "task.accuracy: unknown reward 'nope'"),
    ("task.functions.accuracy=x.py:f", "would hide the built-in"),
    ("eval.n=4", "eval.n > 1 needs eval.temperature > 0"),
    ("data.messages_field=chat", "needs data.chat_template"),
])
def test_task_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy_tiny_cpu.yaml", [override])


# ---- eval numbers and scoring with row fields ---------------------------------------------------------------------

def samples(texts):
    return [Sample([1], [5] * len(t), [-0.1] * len(t), "stop", 0, t) for t in texts]


def test_eval_numbers_pass_at_k_and_mean_at_k():
    good, bad = "so 3 + 4 = 7\n<answer>7</answer>", "<answer>8</answer>"
    groups = [samples([good, bad, bad, bad]), samples([bad] * 4), samples([good, good, bad, good])]
    examples = [Example(i, "q", "7") for i in range(3)]
    scorer = Scorer({"accuracy": 1.0, "format": 0.5})
    got = eval_numbers(groups, examples, scorer, "eval/x/")
    assert got["eval/x/pass@4"] == pytest.approx(2 / 3)  # two of three questions have a correct sample
    assert got["eval/x/mean@4"] == got["eval/x/accuracy"] == pytest.approx(4 / 12)
    assert got["eval/x/format_rate"] == pytest.approx(4 / 12) and got["eval/x/n"] == 3  # bad has no reasoning
    assert got["eval/x/reward"] == pytest.approx((4 * 1.5) / 12)
    greedy = eval_numbers([samples([good]), samples([bad])], examples[:2], scorer, "eval/")
    assert set(greedy) == {"eval/accuracy", "eval/format_rate", "eval/reward", "eval/completion_len", "eval/n"}
    assert greedy["eval/accuracy"] == 0.5


def test_user_reward_sees_the_row(reward_file):
    scorer = Scorer({"row": 1.0}, {"row": f"{reward_file}:with_row"}, accuracy="row", format=None)
    try:
        examples = [Example(0, "q", "7", {"bonus": 3}), Example(1, "q", "7", {"bonus": 0})]
        rewards, details = score([samples(["7", "1"]), samples(["1", "7"])], examples, scorer)
        assert rewards.tolist() == [[4.0, 3.0], [0.0, 1.0]] and "format_rate" not in details
    finally:
        scorer.close()


def test_pool_processes_are_gone_after_close(reward_file):
    pool = RewardPool({"d": f"{reward_file}:digits"}, workers=2, timeout_s=5.0, max_failures=3)
    pool.score("d", ["1", "a"], ["", ""], [{}, {}])
    pids = [p.pid for p in pool._pool._pool_manager.worker_manager.workers.values()]
    assert pids and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    pool.close()
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower()
                   for pid in pids)


def test_the_summary_gives_eval_accuracy_at_start_middle_and_end():
    from launch.metrics import eval_trend

    evals = [{"step": s, "eval/accuracy": a, "eval/n": 64, "eval/gsm8k/accuracy": g}
             for s, a, g in ((0, 0.125, 0.0), (4, 0.2, 0.0), (8, 0.25, 0.0156), (12, 0.3, 0.0), (16, 0.34375, 0.03125))]
    lines = eval_trend(evals, "mawps")
    assert lines[0] == ("  accuracy on mawps's eval set (64 questions): step 0 0.125  →  step 8 0.250  →  step 16 "
                        "0.344  (+21.9 points)")
    assert lines[1].startswith("  accuracy on gsm8k: step 0 0.000") and lines[1].endswith("(+3.1 points)")
    assert eval_trend(evals[:1]) == [] and len(eval_trend(evals[:2])) == 2


def test_holdout_rows_are_the_eval_set_and_never_trained_on(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    over = ["data.source=offline:mawps", "data.train_split=singleop", "data.holdout=100", "data.prompt_field=input",
            "data.answer_field=target", "data.answer_extract=none", "eval.num_examples=null"]
    cfg = load_config("toy_tiny_cpu.yaml", over)
    train, (held,) = load_train(cfg, tok), load_eval_sets(cfg, tok)
    assert len(held.ids) == 100 and held.name == ""  # logged as eval/...: the task's own eval set
    assert not {e.question for e in train.examples} & {e.question for e in held.examples}
    assert len(train.ids) == 448  # 562 rows: 100 held out, 14 more with a held-out row's question
    again = load_config("toy_tiny_cpu.yaml", over + ["train.seed=7"])  # the same held-out rows for every seed
    assert [e.idx for e in load_eval_sets(again, tok)[0].examples] == [e.idx for e in held.examples]
    with pytest.raises(ConfigError, match="leaves no training rows"):
        load_train(load_config("toy_tiny_cpu.yaml", over[:2] + ["data.holdout=600"] + over[3:]), tok)
    from launch.gsm8k import CPU_PRESET

    # make run's default without a GPU: the same rows, GSM8K beside them (the tiny model's 512-token vocabulary makes
    # prompts longer than SmolLM2's, so none is dropped for length here either)
    default = load_config(CPU_PRESET, ["data.max_prompt_tokens=4000"])
    sets = load_eval_sets(default, tok)
    assert [(s.name, len(s.ids)) for s in sets] == [("", 100), ("gsm8k", 32)]
    assert len(load_train(default, tok).ids) == 448
    assert [e.idx for e in sets[0].examples] == [e.idx for e in held.examples]
