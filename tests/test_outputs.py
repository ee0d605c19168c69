"""Outputs that survive: where a relative output dir goes, one writer per folder, and checkpoints that a crash
(a real kill -9, at random moments) never leaves without a loadable one."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import checkpoint
from launch.outputs import LOCK_FILE, OutputDirLocked, OutputLock, resolve_output_dir

ROOT = Path(__file__).resolve().parent.parent


def test_relative_output_dir_rule(tmp_path):
    job_copy = Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd")
    assert resolve_output_dir("/abs/run", job_copy, {}) == Path("/abs/run")
    assert resolve_output_dir("runs/x", Path("/home/me/code"), {}) == Path("/home/me/code/runs/x")
    assert resolve_output_dir("runs/x", job_copy, {"HOME": "/home/me"}) == Path("/home/me/rlvr/runs/x")
    assert resolve_output_dir("runs/x", job_copy, {"RLVR_OUTPUT_ROOT": "/data"}) == Path("/data/runs/x")
    assert resolve_output_dir("runs/x", Path("/code"), {"RLVR_OUTPUT_ROOT": "/data"}) == Path("/data/runs/x")
    assert resolve_output_dir("~/runs/x", job_copy, {}) == Path.home() / "runs/x"


def hold_lock(folder: Path) -> subprocess.Popen:
    code = "import sys, time; from launch.outputs import OutputLock; OutputLock(sys.argv[1]).acquire(); " \
           "print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_writer_per_output_dir_and_stale_locks_are_taken_over(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(OutputDirLocked, match=rf"in use by another run: host .*, pid {holder.pid}, .*another "
                                                  r"train.output_dir"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: the lock file stays behind, naming a dead process
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "1", "job_id": "raysubmit_x",
                                     "since": "then"}))
    with pytest.raises(OutputDirLocked, match="host elsewhere, pid 1, Ray job raysubmit_x"):
        OutputLock(tmp_path).acquire()  # its heartbeat is fresh
    old = time.time() - OutputLock.STALE_S - 5
    os.utime(lock_file, (old, old))
    OutputLock(tmp_path).acquire().release()  # no heartbeat for longer than STALE_S: taken over


SAVER = textwrap.dedent("""
    import sys
    from launch import checkpoint
    out, start = sys.argv[1], int(sys.argv[2])
    step = start
    while True:
        step += 1
        tmp = checkpoint.begin(out, step)
        for rank in range(3):  # several "shards" of 1 MiB, each holding the step
            (tmp / f"shard{rank}.bin").write_bytes(step.to_bytes(4, "little") * (1 << 18))
        checkpoint.commit(tmp, step, {"step": step}, keep=1)
        print(step, flush=True)
""")


def loadable(out: Path) -> int:
    """The latest complete checkpoint's step, after checking every shard is whole and holds that step."""
    latest = checkpoint.latest_checkpoint(out)
    assert latest is not None, sorted(p.name for p in checkpoint.checkpoints_dir(out).iterdir())
    step = checkpoint.read_state(latest)["step"]
    for rank in range(3):
        assert (latest / f"shard{rank}.bin").read_bytes() == step.to_bytes(4, "little") * (1 << 18)
    return step


def test_a_crash_at_any_moment_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    """kill -9 a process that saves checkpoints back to back (keep=1, so each save also removes the previous one),
    at random moments, 15 times; after each, the latest complete checkpoint loads whole, and saving goes on."""
    rng, step = random.Random(0), 0
    for _ in range(15):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), str(step)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        assert int(saver.stdout.readline()) == step + 1  # at least one save done in this life
        time.sleep(rng.uniform(0.0, 0.3))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        step = loadable(tmp_path)
        assert len(checkpoint.complete_checkpoints(tmp_path)) in (1, 2)  # keep=1, or killed between rename and removal
    assert step > 15


def test_checkpoint_files_must_be_visible_to_every_reader(tmp_path):
    written = {"deepspeed/mp_rank_00_model_states.pt": 10, "rng_rank0.pt": 3, "rng_rank1.pt": 3}
    checkpoint.check_visible(dict(written), written, "learner rank 1", tmp_path)
    with pytest.raises(checkpoint.CheckpointNotShared, match=r"learner rank 1 \(pid 7 on 10.0.0.2\) does not see 2 "
                                                             r"of the 3 .*storage that every learner node"):
        checkpoint.check_visible({"rng_rank1.pt": 3}, written, "learner rank 1 (pid 7 on 10.0.0.2)", tmp_path)
    with pytest.raises(checkpoint.CheckpointNotShared, match="does not see 1 of the 3"):  # a file cut short
        checkpoint.check_visible({**written, "rng_rank0.pt": 2}, written, "the driver", tmp_path)
