"""The job as users run it: `ray job submit --working-dir . -- python launch/gsm8k.py ...` against a Ray head
started by the test (private ports, temp dir and token; stopped by its own process group)."""
import time

import pytest
import torch

from launch.checkpoint import latest_checkpoint
from launch.local_job import LocalHead
from launch.metrics import mean_of, read_jsonl

pytestmark = pytest.mark.integration

STEPS = 16
# Reward margin. The toy reward is the digit fraction of 64 samples per step: measured per-step noise is ~0.01-0.02
# (std of the step mean), so a 5-step mean moves by ~0.01 by chance. Learning lifts it by ~0.15-0.2 in 16 steps
# (0.09 → 0.25-0.3). A 0.05 margin is 3-5 noise sigmas above chance and a third of the measured gain.
MARGIN = 0.05


@pytest.fixture(scope="module")
def head(tmp_path_factory, cpu_vllm):
    with LocalHead(num_cpus=4, temp_dir=str(tmp_path_factory.mktemp("ray"))) as h:
        yield h


def submit(head, *args, timeout_s=600):
    code, log = head.submit(["python", "launch/gsm8k.py", "--config", "toy_tiny_cpu.yaml", "train.device=cpu",
                             "eval.every=8", "log.sample_every=0", *args], timeout_s=timeout_s)
    return code, log


@pytest.fixture(scope="module")
def uninterrupted(head, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-full")
    code, log = submit(head, f"train.steps={STEPS}", f"train.output_dir={out}")
    assert code == 0, log[-4000:]
    return out, log


def train_rows(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]


def test_submitted_job_learns(uninterrupted):
    out, log = uninterrupted
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = mean_of(rows[:5], "reward"), mean_of(rows[-5:], "reward")
    assert last >= first + MARGIN, f"reward did not rise: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert "run summary" in log and "grpo: 100%" in log
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "final_model" / "config.json").exists()
    assert list((out / "tensorboard").iterdir())
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    updated = [r["step"] for r in rows if "loss" in r]  # steps whose batch reached the learner
    for r in rows:  # samples come from the weights of the last update before their step
        assert r["weight_version"] == max([s for s in updated if s < r["step"]], default=0)


def test_resume_continues_the_same_data_order(head, uninterrupted, tmp_path):
    full_rows = train_rows(uninterrupted[0])
    code, log = submit(head, f"train.steps={STEPS}", f"train.output_dir={tmp_path}", "train.stop_after=7")
    assert code == 0, log[-4000:]
    assert latest_checkpoint(tmp_path).name == "step-000007"
    assert [r["step"] for r in train_rows(tmp_path)] == list(range(1, 8))

    code, log = submit(head, f"train.steps={STEPS}", f"train.output_dir={tmp_path}")
    assert code == 0, log[-4000:]
    assert "resumed from" in log and "at step 7" in log
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, counter continues at 8
    assert [r["batch_ids"] for r in rows] == [r["batch_ids"] for r in full_rows]  # nothing replayed or skipped
    assert rows[7]["weight_version"] == 7  # the engines got the checkpoint's weights before step 8


def test_oversized_request_fails_fast_naming_the_shortfall(head):
    start = time.time()
    code, log = submit(head, "learner.num_workers=64")
    assert code == 2, log[-3000:]
    assert "CPU: need 65 (learner 64 + rollout 1), cluster has 4" in log
    if not torch.cuda.is_available():  # the test's Ray head sees this machine's GPUs, if any
        code, log = submit(head, "train.device=cuda")
        assert code == 2 and "train.device=cuda but the Ray cluster has no GPU" in log
    assert time.time() - start < 120  # two submissions, each well inside the 60 s placement limit


def test_bad_config_fails_with_the_key_named(head):
    code, log = submit(head, "rollout.temprature=0.5")
    assert code == 2 and "rollout.temprature: unknown key" in log
