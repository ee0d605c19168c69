"""The benches that a GPU sitting runs, run here on CPU at tiny sizes: the same functions on gloo, so a renamed
helper or a changed return type fails CI instead of the sitting."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_gpu_bench_runs_on_cpu(cpu_vllm):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    lines = out.stdout.splitlines()
    for start in ("generation, bf16", "weight sync", "learner ("):
        assert any(line.startswith(start) for line in lines), f"no line starting {start!r} in:\n{out.stdout}"
    syncs = [line for line in lines if line.startswith("weight sync")]
    assert any("learner rank 0 → engine over gloo" in line for line in syncs)  # the 2-GPU shape
    assert any("this process (CPU) → engine over gloo" in line for line in syncs)  # the 1-GPU shape
    ratio = float(next(line for line in lines if line.startswith("generation")).split("ratio ")[1].split()[0])
    assert ratio > 0


def test_learner_layout_bench_runs_on_cpu():
    """bench/learner.py's learner.layout part at tiny sizes (the figures come from its full run, docs/benchmarks.md)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "bench/learner.py", "--part", "layouts", "--layout-model",
                          "builtin:tiny-qwen2", "--layout-samples", "8", "--groups-of", "4", "--layout-prompt-len",
                          "40", "--layout-shortest", "8", "--layout-longest", "24", "--steps", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    line = next(line for line in out.stdout.splitlines() if line.strip().startswith("groups of  4"))
    assert "shared ÷ padded" in line and "packed ÷ padded" in line, line
    losses = [float(x) for x in line.split("losses ")[1].split(" = ")]
    assert max(losses) - min(losses) < 1e-5, line  # the same loss in every layout


def test_learner_checkpointing_bench_runs_on_cpu():
    """bench/learner.py's checkpointing × micro-batch part at tiny sizes: one row per setting, the same loss in each
    (checkpointing only recomputes)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "bench/learner.py", "--part", "checkpointing", "--layout-model",
                          "builtin:tiny-qwen2", "--ckpt-samples", "8", "--micro-batches", "8",
                          "--layout-prompt-len", "40", "--layout-shortest", "8", "--layout-longest", "24", "--steps",
                          "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| o")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("on", "8"), ("off", "8")]
    losses = [float(r[4]) for r in rows]
    assert max(losses) - min(losses) < 1e-5 and all(float(r[2]) > 0 for r in rows), out.stdout
    assert "fastest: checkpointing" in out.stdout


def test_chaos_soak_short(cpu_vllm):
    """bench/chaos.py's short version: the faults no other test makes at the default timeouts and through a real
    multi-node `ray job submit` (tests/test_faults.py kills engines and the learner): engine SIGSTOP, a whole node
    lost (a spare added) and driver kill -9, into the toy job on 4 one-CPU nodes. The job ends in one Ray job with
    every step logged once and its model exported, nothing of it is left, each fault costs at most ckpt.every (10)
    steps computed again, and a stopped engine at most 90 s (found from progress at timeouts.stall_s, 45 s, where
    the generate timeout is 1200 s)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    kinds = ["engine_stop", "node_loss", "driver_kill"]
    out = subprocess.run([sys.executable, "bench/chaos.py", "--steps", "16", "--faults", "1", "--seed", "1",
                          "--kinds", ",".join(kinds), "--timeout", "1200"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:7]] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| fault")}
    assert sorted(rows) == sorted(kinds), out.stdout
    for kind, (injected, survived, _, worst, redo) in rows.items():
        assert int(injected) == int(survived) == 1 and int(redo) <= 10, (kind, out.stdout)
    assert float(rows["engine_stop"][3]) <= 90, out.stdout
    for check in ("every step logged exactly once", "final model exported", "no process of the run left"):
        assert f"ok   {check}" in out.stdout, out.stdout


def test_base_rates_bench_runs_on_cpu(cpu_vllm):
    """bench/base_rates.py at tiny sizes on the tiny model: a table row per set asked for, with numbers in [0, 1]
    (SVAMP's question from two fields, ASDiv's leading-number golds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "bench/base_rates.py", "--sets", "svamp,asdiv,mawps_singleop",
                          "--questions", "3", "--samples", "2", "model.path=builtin:tiny-qwen2",
                          "rollout.max_tokens=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| set")}
    assert sorted(rows) == ["asdiv", "mawps_singleop", "svamp"], out.stdout
    assert all(0 <= float(v) <= 1 for cells in rows.values() for v in cells[:6]), out.stdout


def test_multiturn_bench_runs_on_cpu():
    """bench/multiturn.py at tiny sizes on the tiny model: both modes generate, the multi-turn one makes every turn
    it was asked for with no failed environment call, over about the same model tokens (the ratio's figure comes
    from its full run, docs/benchmarks.md)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "bench/multiturn.py", "--model", "builtin:tiny-qwen2", "--prompts", "2",
                          "--n", "4", "--max-tokens", "16", "--shapes", "2x4", "--rounds", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| multi-turn")]
    assert len(rows) == 1, out.stdout
    multi, mt, single = rows[0][0], int(rows[0][1]), rows[0][4]
    st = int(single.split(",")[0])
    assert "2 turns, 2.00 made, 4 env tokens" in multi, out.stdout
    assert st == 2 * 4 * 16 and st <= mt <= 1.5 * st, out.stdout  # each turn its minimum, a stop token or two past
    assert "failed environment calls: 0\n" in out.stdout, out.stdout
    assert float(out.stdout.split("2x4 / single-turn model tok/s: ")[1].split()[0]) > 0, out.stdout
