"""The built-in Python tool's sandbox against hostile code, and the environment pool against failing
environments: real processes (the sandbox's own, pebble's pool), no Ray or vLLM."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.config import EnvConfig
from rollout.env import EnvironmentFailed, EnvPool, Reply
from rollout.python_tool import PythonTool, cut, last_code_block, run_python

ENVS = str(Path(__file__).with_name("envs.py"))
FAST = dict(timeout_s=3.0, cpu_s=1, memory_mb=256, file_mb=1, max_output_chars=300)


def test_plain_code_prints_its_result():
    run = run_python("import numpy as np\nprint(sum(range(10)), np.arange(4).sum())", **FAST)
    assert (run.ok, run.output, run.limit) == (True, "45 6", "")


def test_an_error_shows_the_code_s_own_traceback():
    run = run_python("def f(x):\n    return 1 / x\nf(0)", **FAST)
    assert not run.ok and run.output.endswith("ZeroDivisionError: division by zero")
    assert 'File "main.py", line 2, in f' in run.output and "prelude" not in run.output


@pytest.mark.parametrize("name, code, limit, says", [
    ("infinite loop", "while True:\n    pass", "cpu", "CPU time"),
    ("sleeps forever", "import time\ntime.sleep(3600)", "timeout", "ran past 3s"),
    ("10 GB allocation", "x = bytearray(10 * 2**30)", "memory", "MemoryError"),
    ("prints 100 MB", "print('x' * 100_000_000)", "output", "wrote more than 1 MiB"),
    ("prints forever", "while True:\n    print('y' * 1000)", "output", "wrote more than 1 MiB"),
])
def test_hostile_code_is_stopped_at_its_limit(name, code, limit, says):
    run = run_python(code, **FAST)
    assert not run.ok and run.limit == limit and says in run.output, (name, run)
    assert run.seconds < FAST["timeout_s"] + 2 and len(run.output) < FAST["max_output_chars"] + 100


@pytest.mark.parametrize("name, code, refused", [
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "os.fork"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("os.system", "import os\nos.system('true')", "os.system"),
    ("writes outside its directory", "open('/tmp/rlvr-sandbox-escape', 'w').write('x')", "outside its directory"),
    ("deletes outside its directory", "import os\nos.remove('/tmp/rlvr-sandbox-victim')", "outside its directory"),
    ("reads the parent's environment", "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
     "another process"),
    ("kills its parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "signals to other processes"),
    ("ctypes", "import ctypes\nctypes.CDLL(None).kill(1, 9)", "ctypes.dlsym"),
    ("a socket", "import socket\nsocket.socket().connect(('127.0.0.1', 9))", "socket"),
])
def test_hostile_code_is_refused(name, code, refused, tmp_path):
    victim = Path("/tmp/rlvr-sandbox-victim")
    victim.write_text("keep me")
    try:
        run = run_python(code, **FAST)
        assert not run.ok and refused in run.output and "PermissionError: sandbox" in run.output, (name, run)
        assert not Path("/tmp/rlvr-sandbox-escape").exists() and victim.read_text() == "keep me"
    finally:
        victim.unlink(missing_ok=True)


def test_the_code_sees_no_inherited_environment_and_its_own_directory(monkeypatch):
    monkeypatch.setenv("RLVR_SECRET_TOKEN", "hunter2")
    run = run_python("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\nopen('f.txt', 'w').write('ok')\n"
                     "print(open('f.txt').read())", **FAST)
    assert run.ok and "RLVR_SECRET_TOKEN" not in run.output and "hunter2" not in run.output
    env, cwd, content = run.output.splitlines()
    assert "PATH" in env and "rlvr-python-" in cwd and content == "ok"
    assert not os.path.exists(cwd)  # the directory is deleted afterwards


def test_output_is_cut_head_and_tail():
    text = "a" * 50 + "b" * 50
    assert cut(text, 200) == text
    assert cut(text, 20) == "a" * 10 + "\n... [80 characters cut] ...\n" + "b" * 10


def test_the_tool_runs_the_last_code_block_and_is_done_without_one():
    tool = PythonTool(**FAST)
    turn = "First:\n```python\nprint(1)\n```\nthen\n```python\nprint(6 * 7)\n```"
    assert last_code_block(turn) == "print(6 * 7)"
    assert last_code_block("```py\nprint(2)") == "print(2)"  # cut at a stop string before its closing fence
    reply = tool.step({}, ["...", turn])
    assert reply.observation == "```output\n42\n```\n" and not reply.done
    assert reply.info["tool_calls"] == 1 and reply.info["tool_ok"] == 1 and reply.info["tool_errors"] == 0
    assert tool.step({}, ["The answer is <answer>42</answer>"]) == Reply(done=True)
    bad = tool.step({}, ["```python\nwhile True:\n    pass\n```"])
    assert bad.info["tool_errors"] == 1 and bad.info["tool_timeouts"] == 1 and "CPU time" in bad.observation


def pool(name: str, **kw) -> EnvPool:
    return EnvPool(EnvConfig(name=f"{ENVS}:{name}", workers=1, **{"timeout_s": 2.0, "max_failures": 3, **kw}))


def test_the_pool_runs_the_python_tool_on_hostile_code_and_goes_on():
    p = EnvPool(EnvConfig(name="python", args=FAST, workers=2, timeout_s=10))
    try:
        codes = ["import os\nwhile True:\n    os.fork()", "x = bytearray(10 * 2**30)", "print(1 + 1)"]
        replies = [p.result(p.submit({}, [f"```python\n{c}\n```"]))[0] for c in codes]
        assert [r.info["tool_errors"] for r in replies] == [1, 1, 0]
        assert replies[2].observation == "```output\n2\n```\n" and p.in_a_row == 0
    finally:
        p.close()


@pytest.mark.parametrize("env, cause", [
    ("Raises", "KeyError: \"the environment's own bug\""),
    ("Hangs", "timed out after 2s"),
    ("KillsItself", "its process died"),
    ("WrongReply", "TypeError: step() returned str"),
])
def test_a_failing_environment_is_counted_then_stops_the_run(env, cause):
    p = pool(env)
    try:
        for k in (1, 2):
            reply, why = p.result(p.submit({"q": 1}, ["turn"]))
            assert reply is None and cause in why and p.in_a_row == k
        with pytest.raises(EnvironmentFailed, match=f"environment '{ENVS}:{env}'.*failed 3 calls in a row "
                                                    r"\(env.max_failures=3\)") as err:
            p.result(p.submit({"q": 1}, ["turn"]))
        assert cause in str(err.value)
    finally:
        p.close()


def test_failures_not_in_a_row_do_not_stop_the_run():
    p = pool("FailsOnOdd")
    try:
        results = [p.result(p.submit({"q": q}, ["turn"])) for q in [1, 2, 3, 4, 5, 6, 7]]
        assert [r is None for r, _ in results] == [True, False, True, False, True, False, True]
        assert p.in_a_row == 1
    finally:
        p.close()


def test_an_environment_that_names_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="no file"):
        EnvPool(EnvConfig(name="no/such/env.py:Env"))
    with pytest.raises(ValueError, match="has no function 'Nope'"):
        EnvPool(EnvConfig(name=f"{ENVS}:Nope"))


def test_the_readme_environment_runs_as_written(tmp_path):
    """README's environment example, copied from README.md as it stands, in the real pool."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("# /data/my_task/hint_env.py")
    code = readme[start:readme.index("```", start)]
    (tmp_path / "hint_env.py").write_text(code)
    p = EnvPool(EnvConfig(name=f"{tmp_path / 'hint_env.py'}:Hint", args={"hints": 1}, workers=1))
    try:
        first, _ = p.result(p.submit({"answer": "42"}, ["Is it 41?"]))
        assert first.observation == "\nHint: the answer has 2 characters.\n" and first.info == {"hints": 1}
        second, _ = p.result(p.submit({"answer": "42"}, ["Is it 41?", "Then <answer>42</answer>"]))
        assert second.done
    finally:
        p.close()
