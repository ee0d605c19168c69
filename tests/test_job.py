"""The job as users run it: `ray job submit --working-dir . -- python launch/gsm8k.py ...` against a Ray head
started by the test (private ports, temp dir and token; stopped by its own process group)."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from core.models import cache_dir
from launch.checkpoint import latest_checkpoint
from launch.local_job import ROOT, LocalHead, _group_alive
from launch.metrics import mean_of, read_jsonl
from launch.exits import STOPPED as EXIT_STOPPED
from tests import procs

pytestmark = pytest.mark.integration

STEPS = 16
# Reward margin. The toy reward is the digit fraction of 64 samples per step: measured per-step noise is ~0.01-0.02
# (std of the step mean), so a 5-step mean moves by ~0.01 by chance. Learning lifts it by ~0.15-0.2 in 16 steps
# (0.09 → 0.25-0.3). A 0.05 margin is 3-5 noise sigmas above chance and a third of the measured gain.
MARGIN = 0.05


@pytest.fixture(scope="module")
def head(tmp_path_factory, cpu_vllm):
    """The jobs' Ray head, started from an environment holding secrets (W&B, hub), as a user's shell would: every
    job and actor inherits them, and `test_no_secret_reaches_an_output_file` looks for them in what jobs write."""
    with pytest.MonkeyPatch.context() as env:  # LocalHead copies the environment when it is made
        for k, v in PLANTED.items():
            env.setenv(k, v)
        h = LocalHead(num_cpus=4, temp_dir=str(tmp_path_factory.mktemp("ray")))
    with h:
        yield h


PLANTED = {"WANDB_API_KEY": "planted-wandb-" + os.urandom(8).hex(), "HF_TOKEN": "hf_planted" + os.urandom(8).hex()}


def submit(head, *args, timeout_s=600, **kwargs):
    code, log = head.submit(["python", "launch/gsm8k.py", "--config", "toy_tiny_cpu.yaml", "train.device=cpu",
                             "eval.every=8", "log.sample_every=0", *args], timeout_s=timeout_s, **kwargs)
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
        assert r["staleness"] == 0


def test_no_secret_reaches_an_output_file(head, uninterrupted):
    """The secrets in the jobs' environment (and the head's auth token) are in no file of a finished run: config,
    metrics, logs, TensorBoard, checkpoints, the exported model; nor in the job's log."""
    out, log = uninterrupted
    planted = [v.encode() for v in (*PLANTED.values(), head.env["RAY_AUTH_TOKEN"])]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.name == "config.yaml" for f in files) and any("checkpoint" in str(f) or "step-" in str(f)
                                                               for f in files)
    leaks = [(str(f.relative_to(out)), s.decode()[:12]) for f in files for s in planted if s in f.read_bytes()]
    assert not leaks and not any(s.decode() in log for s in planted), leaks


def test_a_run_stopped_two_ways_resumes_each_time_also_after_a_code_edit(head, uninterrupted, tmp_path):
    """One run interrupted the ways users interrupt one, and each time resumed by submitting the same command again:
    `train.stop_after=7` (a checkpoint at step 7); `ray job stop` (SIGTERM: the job ends its step, writes a
    checkpoint, exits 75); a code edit between submissions. (A driver killed with -9 is started again inside the
    same job: tests/test_bench.py's chaos soak.) Under `ray job submit --working-dir`, a relative output_dir lands
    under ~/rlvr (here a test HOME), not in Ray's copy of the code, so every submission finds the checkpoint. In
    the end each step ran once, with the same step counter and prompts as an uninterrupted run."""
    code_dir, home = tmp_path / "code", tmp_path / "home"
    shutil.copytree(ROOT, code_dir, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "gpu_kit",
                                                                  "*.egg-info", ".pytest_cache"))
    env = {"HOME": str(home), "RLVR_CACHE": str(cache_dir())}
    args = [f"train.steps={STEPS}", "train.output_dir=runs/relative", "eval.every=0", "ckpt.export_hf=false"]
    out = home / "rlvr" / "runs" / "relative"
    full_rows = train_rows(uninterrupted[0])

    code, log = submit(head, *args, "train.stop_after=7", working_dir=code_dir, env=env)
    assert code == 0 and f"output dir {out}" in log, log[-4000:]
    assert latest_checkpoint(out).name == "step-000007"
    assert [r["step"] for r in train_rows(out)] == list(range(1, 8))

    def stop_at_step_10(job_id, cli):
        def watch():
            procs.wait_for(lambda: steps_logged(out) >= 10, 300, 0.2, "step 10")
            # what `ray job stop` sends, without the CLI's seconds of start-up (the toy job's steps are shorter)
            urllib.request.urlopen(urllib.request.Request(
                f"{head.address}/api/jobs/{job_id}/stop", method="POST",
                headers={"Authorization": "Bearer " + head.env["RAY_AUTH_TOKEN"]}), timeout=60).read()
        threading.Thread(target=watch, daemon=True).start()

    code, log = submit(head, *args, working_dir=code_dir, env=env, on_start=stop_at_step_10)
    assert code == EXIT_STOPPED, log[-3000:]
    assert "resumed from" in log and "at step 7" in log
    stopped = int(re.search(r"SIGTERM: stopped after step (\d+) with its checkpoint", log).group(1))
    assert 10 <= stopped < STEPS
    assert latest_checkpoint(out).name == f"step-{stopped:06d}"
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, stopped + 1))  # each step once, counter continued at 8
    assert rows[7]["weight_version"] == 7  # the engines got the checkpoint's weights before step 8

    with open(code_dir / "launch" / "train.py", "a") as f:
        f.write("\n# an edit between submissions: Ray unpacks this code into a new folder\n")
    code, log = submit(head, *args, working_dir=code_dir, env=env)
    assert code == 0 and "resumed from" in log and f"at step {stopped}" in log, log[-3000:]
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["batch_ids"] for r in rows] == [r["batch_ids"] for r in full_rows]  # nothing replayed or skipped


@pytest.fixture(scope="module")
def one_step_off(head, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-one-step-off")
    code, log = submit(head, f"train.steps={STEPS}", f"train.output_dir={out}", "train.pipeline=one_step_off")
    assert code == 0, log[-4000:]
    return out, log


def test_one_step_off_pipeline_learns_one_update_behind(one_step_off, uninterrupted):
    out, log = one_step_off
    rows = train_rows(out)
    assert "pipeline one_step_off" in log and [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = mean_of(rows[:5], "reward"), mean_of(rows[-5:], "reward")
    assert last >= first + MARGIN, f"reward did not rise: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert [r["batch_ids"] for r in rows] == [r["batch_ids"] for r in train_rows(uninterrupted[0])]  # same data
    updated = [r["step"] for r in rows if "loss" in r]
    for r in rows:  # step k's batch was generated while step k-1 trained: by the weights of the update before it
        assert r["weight_version"] == max([s for s in updated if s < r["step"] - 1], default=0), r
        assert r["staleness"] == (1 if r["step"] - 1 in updated else 0), r
    assert "rollout_seconds" not in rows[0] and all(r["rollout_seconds"] > 0 for r in rows[1:])  # in the background
    # The importance correction sees the update's gap: the engines' logprobs are far from the learner's, where the
    # sync run's differ only by kernels.
    behind, same = mean_of(rows[2:], "mismatch_kl"), mean_of(train_rows(uninterrupted[0])[2:], "mismatch_kl")
    assert behind > 10 * same, (behind, same)


def test_one_step_off_resume_continues_the_same_data_order(head, one_step_off, tmp_path):
    args = [f"train.steps={STEPS}", f"train.output_dir={tmp_path}", "train.pipeline=one_step_off", "eval.every=0",
            "ckpt.export_hf=false"]
    code, log = submit(head, *args, "train.stop_after=7")
    assert code == 0, log[-4000:]
    assert latest_checkpoint(tmp_path).name == "step-000007"
    code, log = submit(head, *args)
    assert code == 0 and "at step 7" in log, log[-4000:]
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["batch_ids"] for r in rows] == [r["batch_ids"] for r in train_rows(one_step_off[0])]
    assert rows[7]["weight_version"] == 7  # step 8 is generated again, from the checkpoint's weights


def test_refill_keeps_every_step_full_in_data_order(head, uninterrupted, tmp_path):
    """2 samples of 2 tokens per prompt: most groups score 0 twice (no digit), so most are filtered; refill draws
    further prompts in data order until each step has prompts_per_step groups with a reward spread."""
    steps, per_step = 4, 4
    code, log = submit(head, f"train.steps={steps}", f"train.output_dir={tmp_path}", f"train.prompts_per_step={per_step}",
                       "rollout.n=2", "rollout.max_tokens=2", "grpo.refill=true", "grpo.refill_max_prompts=64",
                       "eval.every=0", "ckpt.export_hf=false")
    assert code == 0, log[-4000:]
    rows = train_rows(tmp_path)
    assert sum(r["groups_filtered"] for r in rows) >= sum(r["groups"] for r in rows) / 2, rows  # half or more equal
    for r in rows:
        assert r["groups_kept"] == per_step and r["refill_capped"] == 0 and r["train_seqs"] == 2 * per_step, r
        assert r["refill_prompts"] == r["groups"] - per_step
    assert sum(r["refill_prompts"] for r in rows) > 0
    drawn = [i for r in rows for i in r["batch_ids"]]
    full = [i for r in train_rows(uninterrupted[0]) for i in r["batch_ids"]]
    assert len(drawn) <= len(full) and drawn == full[:len(drawn)]  # in data order: nothing skipped or drawn twice
    assert "groups kept 4/" in log


def test_eval_only_reproduces_the_final_eval(head, uninterrupted, tmp_path):
    """`launch/evaluate.py` on the run's exported model, and on its last checkpoint, prints the numbers the run's
    own final eval logged, to the last digit (greedy, the same engines and the same code)."""
    out = uninterrupted[0]
    final = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r][-1]
    assert final["step"] == STEPS
    assert json.loads((out / "final_model" / "config.json").read_text())["use_cache"] is True  # ready for generate()
    for which, target in (("--model", out / "final_model"), ("--checkpoint", out)):
        result = tmp_path / f"{which[2:]}.json"
        code, log = head.submit(["python", "launch/evaluate.py", "--config", "toy_tiny_cpu.yaml", which, str(target),
                                 "--output", str(result), "train.device=cpu"], timeout_s=300)
        assert code == 0, log[-3000:]
        got = json.loads(result.read_text())
        assert set(got) == {k for k in final if k.startswith("eval/")}
        assert got == {k: final[k] for k in got}, (which, got, final)
        assert f"eval: accuracy {final['eval/accuracy']:.4f}" in log


USER_REWARD = """
import time

def digits(completion, gold, row):
    assert row["question"]  # the row's fields come along
    if len(completion) % 23 == 0:
        time.sleep(5)  # past task.reward_timeout_s
    if len(completion) % 11 == 1:
        raise RuntimeError("user reward bug")
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)

def broken(completion, gold):
    return {"score": 1}[completion]
"""


def test_user_reward_from_a_file_reaches_metrics_and_its_failures_are_counted(head, tmp_path):
    """A reward in a file outside the repository, named in the config of a submitted job: its scores reach
    metrics.jsonl; calls that time out or raise score 0, are counted, and the job goes on."""
    reward_file = tmp_path / "elsewhere" / "my_reward.py"
    reward_file.parent.mkdir()
    reward_file.write_text(USER_REWARD)
    code, log = submit(head, "train.steps=3", f"train.output_dir={tmp_path / 'out'}",
                       f"task.functions.mine={reward_file}:digits", "rewards.mine=1.0", "task.reward_timeout_s=1",
                       "task.reward_max_failures=1000", "ckpt.export_hf=false", "eval.num_examples=8")
    assert code == 0, log[-3000:]
    rows = train_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 < r["reward/mine"] < 1 for r in rows)
    failures = [r["reward_failures/mine"] for r in rows]
    assert failures == sorted(failures) and failures[-1] > 0 and "reward failures" in log
    evals = [r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 3]


def test_a_reward_failing_k_times_in_a_row_stops_the_job(head, tmp_path):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(USER_REWARD)
    code, log = submit(head, "train.steps=3", f"train.output_dir={tmp_path / 'out'}",
                       f"task.functions.broken={reward_file}:broken", "rewards.broken=1.0",
                       "task.reward_max_failures=5", "eval.every=0")
    assert code == 1, log[-3000:]
    assert "error: reward 'broken'" in log and "failed 5 times in a row" in log and "KeyError" in log, log[-3000:]
    assert 'return {"score": 1}[completion]' in log  # the user's traceback, with the line that failed


def test_math_preset_runs_on_cpu(head, tmp_path):
    """The MATH preset end to end on a tiny random model: MATH prompts and \\boxed{} rewards (math-verify, in the
    pool), three eval sets sampled twice per question (pass@2, mean@2). The digits reward is added so that groups differ and the learner trains."""
    code, log = head.submit(["python", "launch/gsm8k.py", "--config", "math_qwen2.5_0.5b.yaml",
                             "model.path=builtin:tiny-qwen2", "model.dtype=float32", "train.device=cpu",
                             "train.steps=2", "train.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=16",
                             "rollout.cpu_kv_cache_gb=0.25", "rewards.digits=1.0", "eval.num_examples=8",
                             "eval.every=2", "eval.n=2", "eval.temperature=1.0", "learner.micro_batch_size=16", "learner.gradient_checkpointing=false",
                             "ckpt.export_hf=false", f"train.output_dir={tmp_path}"], timeout_s=600)
    assert code == 0, log[-3000:]
    assert "task math;" in log
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and any("loss" in r for r in rows)
    assert all(r["reward_failures/math_accuracy"] == 0 and "reward/math_accuracy" in r for r in rows)
    final = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/accuracy" in r][-1]
    for prefix in ("eval/", "eval/math500/", "eval/gsm8k/"):
        assert 0 < final[prefix + "n"] <= 8 and 0 <= final[prefix + "accuracy"] <= 1 and prefix + "format_rate" in final
        assert final[prefix + "pass@2"] >= final[prefix + "mean@2"] == final[prefix + "accuracy"]  # 2 samples each


def test_oversized_request_fails_fast_naming_the_shortfall(head):
    start = time.time()
    code, log = submit(head, "learner.num_workers=64")
    assert code == 2, log[-3000:]
    assert "CPU: need 65 (learner 64 + rollout 1), cluster has 4" in log
    if not torch.cuda.is_available():  # the test's Ray head sees this machine's GPUs, if any
        # The GPU preset, as a new user on a machine without GPUs would run it: the model first (no hub here)...
        code, log = head.submit(["python", "launch/gsm8k.py", "--config", "gsm8k_qwen2.5_0.5b.yaml"], timeout_s=300,
                                env={"HF_HUB_OFFLINE": "1"})  # as here, where the hub is unreachable
        assert code == 2 and "model.path 'Qwen/Qwen2.5-0.5B' is neither a local folder nor in the Hugging Face " \
                             "cache" in log, log[-3000:]
        # ...then, with a model at hand, the GPUs it asks for.
        code, log = head.submit(["python", "launch/gsm8k.py", "--config", "gsm8k_qwen2.5_0.5b.yaml",
                                 "model.path=builtin:tiny-qwen2"], timeout_s=300)
        assert code == 2 and "train.device=cuda but the Ray cluster has no GPU: GPU: need 2 (learner 1 + " \
                             "rollout 1), cluster has 0" in log, log[-3000:]
        assert "Traceback" not in log
    assert time.time() - start < 150  # three submissions, each failing within seconds


def test_bad_config_fails_with_the_key_named(head):
    code, log = submit(head, "rollout.temprature=0.5")
    assert code == 2 and "rollout.temprature: unknown key" in log


def steps_logged(out: Path) -> int:
    try:
        return len(train_rows(out))
    except ValueError:  # a line read while it is being written
        return 0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_make_run_stopped_by_a_signal_leaves_nothing_behind(sig, cpu_vllm, tmp_path):
    """`make run` killed the ways a user kills it (kill on make; Ctrl-C and a closed terminal on the whole process
    group): its Ray head and job stop, and the head's temp dir is removed."""
    make = subprocess.Popen(["make", "--no-print-directory", "run",
                             f"ARGS=--config toy_tiny_cpu.yaml train.device=cpu train.output_dir={tmp_path} "
                             "eval.every=0 log.sample_every=0 train.steps=200"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, head = [], None
    for line in make.stdout:
        lines.append(line)
        head = head or re.search(r"temp dir (\S+), pid (\d+)\)", line)
        if head and (sig != "SIGTERM" or "grpo:" in line):  # SIGTERM once the job trains; the others at once
            break
    assert head, "".join(lines)[-3000:]
    temp_dir, head_pid = head.group(1), int(head.group(2))
    # make's own child (the runner's children may briefly carry its title between fork and exec)
    runner = [p for p in procs.children_map().get(make.pid, []) if "launch.local_job" in procs.title(p)]
    assert len(runner) == 1
    if sig == "SIGTERM":
        os.kill(make.pid, signal.SIGTERM)  # `kill <make>`: make passes it on (and the child has PDEATHSIG)
    else:
        os.killpg(make.pid, getattr(signal, sig))  # the terminal signals the whole foreground group
    threading.Thread(target=lambda: lines.extend(make.stdout), daemon=True).start()  # keep the pipe drained
    procs.wait_for(lambda: not (_group_alive(head_pid) or Path(temp_dir).exists() or procs.alive(runner[0])), 180,
                   0.5, f"the runner, the head's processes and its temp dir gone after {sig}")
    if sig == "SIGTERM":  # the job was training: it stopped at a step boundary with a checkpoint
        assert latest_checkpoint(tmp_path) is not None, "".join(lines)[-3000:]
