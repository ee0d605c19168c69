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
