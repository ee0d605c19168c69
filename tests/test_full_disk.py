"""A full disk, for real: the output dir on a size-limited tmpfs (mounted by the test, as root), filled up by a
file that takes its free space while the job runs. A checkpoint that cannot be written leaves the previous one as
it was, and the run goes on (ckpt.on_error=continue) or stops with an error naming the path and the bytes needed;
metrics.jsonl never holds half a line."""
import json
import os
import shutil
import subprocess

import pytest

from launch import checkpoint
from launch.config import load_config
from launch.metrics import MetricsLog, MetricsNotWritten, read_jsonl
from launch.train import train
from tests import procs
from tests.test_faults import Saboteur, steps_done

pytestmark = pytest.mark.integration

ARGS = ["train.device=cpu", "train.steps=6", "train.prompts_per_step=4", "eval.every=0", "log.sample_every=0",
        "log.tensorboard=false", "ckpt.every=2", "ckpt.keep=1", "ckpt.export_hf=false"]


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs: a toy checkpoint is ~6 MiB."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"this test mounts a tmpfs and must run as root: {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def leave_free(mount, nbytes: int) -> None:
    """Grow or shrink the filler file so that `nbytes` stay free on the filesystem."""
    filler = mount / "filler"
    size = filler.stat().st_size if filler.exists() else 0
    target = max(0, size + shutil.disk_usage(mount).free - nbytes)
    if target < size:
        os.truncate(filler, target)
    elif target > size:
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.posix_fallocate(fd, 0, target)
        finally:
            os.close(fd)


def test_a_metrics_line_that_does_not_fit_is_not_half_written(small_disk):
    cfg = load_config("toy_tiny_cpu.yaml", ["log.tensorboard=false"])
    log = MetricsLog(small_disk, cfg)
    for step in (1, 2):
        log.log(step, {"reward": 0.5})
    leave_free(small_disk, 0)
    with pytest.raises(MetricsNotWritten, match=r"cannot write step 3's line to .*metrics.jsonl .*No space left"):
        log.log(3, {"reward": 0.5}, extra={"batch_ids": list(range(2000))})  # more than a page: a partial write
    assert [r["step"] for r in read_jsonl(small_disk / "metrics.jsonl")] == [1, 2]  # whole lines only
    with pytest.raises(MetricsNotWritten, match="on resume"):  # the rewrite on resume leaves the file as it was
        MetricsLog(small_disk, cfg, start_step=1)
    assert [r["step"] for r in read_jsonl(small_disk / "metrics.jsonl")] == [1, 2]


def test_a_full_disk_skips_or_stops_at_a_checkpoint_and_the_last_one_loads(ray_local, cpu_vllm, small_disk, caplog):
    """on_error=continue: step 2's checkpoint fails while it is written (the first one's size is only an estimate),
    step 4's is written once there is room, step 6's is refused before writing (the disk is full again); the run
    ends. Then on_error=stop, the disk still full: the run resumes from step 4's checkpoint and stops at step 6's
    with the error."""
    out = small_disk / "run"
    need = {}

    def fill_around_checkpoints():
        procs.wait_for(lambda: (out / "config.yaml").exists(), 300, 0.01, "the run's output dir")
        leave_free(small_disk, 5 << 20)  # more than the first estimate, less than the checkpoint
        procs.wait_for(lambda: steps_done(out) >= 2, 300, 0.01, "step 2 logged")
        leave_free(small_disk, 24 << 20)
        procs.wait_for(lambda: steps_done(out) >= 4, 300, 0.01, "step 4 logged")
        need["bytes"] = sum(checkpoint.manifest(checkpoint.latest_checkpoint(out)).values())
        leave_free(small_disk, 1 << 20)

    saboteur = Saboteur(fill_around_checkpoints)
    saboteur.start()
    train(load_config("toy_tiny_cpu.yaml", ARGS + [f"train.output_dir={out}", "ckpt.on_error=continue"]))
    saboteur.join(timeout=10)
    assert saboteur.error is None, saboteur.error
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["checkpoint_failures"] for r in rows] == [0, 1, 1, 1, 1, 2]
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-000004"]
    assert not list(checkpoint.checkpoints_dir(out).glob(".tmp-*"))  # the failed one's space was given back
    skipped = [r.getMessage() for r in caplog.records if "going on without the checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and "could not write the checkpoint" in skipped[0] and "MiB are free" in skipped[0]
    assert "no room for the checkpoint" in skipped[1], skipped

    with pytest.raises(checkpoint.CheckpointWriteFailed) as stopped:
        train(load_config("toy_tiny_cpu.yaml", ARGS + [f"train.output_dir={out}", "ckpt.on_error=stop"]))
    message = str(stopped.value)
    assert "no room for the checkpoint" in message and str(out / "checkpoints" / "step-000006") in message
    assert f"({need['bytes']} bytes" in message and "MiB are free" in message
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # resumed at 4 (it loaded); step 6 stopped at its checkpoint
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-000004"]
    assert json.loads((checkpoint.latest_checkpoint(out) / checkpoint.STATE_FILE).read_text())["step"] == 4
