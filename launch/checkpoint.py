"""Checkpoint folders: written under a temporary name and renamed into place only when complete and durable.

    output_dir/checkpoints/step-000040/{deepspeed/…, rng_rank*.pt, trainer_state.json}

The commit order makes every moment safe, whatever crashes when:
1. every rank writes its files into `.tmp-step-…`; the driver checks that it sees every file every rank wrote,
   and each rank that it sees every other rank's files (`check_visible`: storage that is not shared across nodes
   is an error at the first checkpoint, not a failed resume days later);
2. the trainer state is written last; every file and folder is fsynced;
3. the folder is renamed to `step-…` and the parent fsynced: only now does it count as complete;
4. older checkpoints beyond `keep` are first renamed to `.del-step-…` (never again mistaken for complete), then
   removed. A step that already has a complete checkpoint is not written again.
A crash leaves at most `.tmp-…` / `.del-…` folders, which are never loaded and are removed by the next save; the
newest complete `step-…` folder stays loadable throughout.

A save that cannot be written (no space, a read-only mount, a quota) raises `CheckpointWriteFailed` naming the
folder and the bytes it needs, and leaves the previous checkpoint as it was: `room` checks the free space against
the last checkpoint's size before anything is written (a full disk is found there), and `discard` removes a
half-written folder. What the job then does is `ckpt.on_error`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"


BYTES_PER_PARAM = 12  # the first checkpoint's size, before there is one to measure: fp32 weights + Adam's m and v


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written. `before_writing`: found by `room`, before any rank wrote a byte."""

    def __init__(self, message: str, before_writing: bool):
        super().__init__(message)
        self.before_writing = before_writing


def bytes_needed(output_dir: str | Path, params: int) -> int:
    """What the next checkpoint will take: the size of the latest one, or an estimate from the parameter count."""
    latest = latest_checkpoint(output_dir)
    return sum(manifest(latest).values()) if latest else params * BYTES_PER_PARAM


def room(output_dir: str | Path, step: int, need: int) -> None:
    """Raise `CheckpointWriteFailed` unless the checkpoints folder is writable and has `need` bytes free."""
    root = checkpoints_dir(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointWriteFailed(f"cannot make the checkpoints folder {root}: {err}", True) from err
    clear_debris(root)  # a save that crashed half-way holds space the next one needs
    free = shutil.disk_usage(root).free
    where = root / step_name(step)
    if not os.access(root, os.W_OK):
        raise CheckpointWriteFailed(f"cannot write the checkpoint {where}: {root} is not writable (a read-only "
                                    f"mount?); it needs {need / 2**20:.1f} MiB", True)
    if free < need:
        raise CheckpointWriteFailed(f"no room for the checkpoint {where}: it needs {need / 2**20:.1f} MiB "
                                    f"({need} bytes, the size of the last one), {free / 2**20:.1f} MiB are free on "
                                    f"its filesystem", True)


def discard(tmp: Path) -> None:
    """Remove a checkpoint folder that failed half-way (its space is what the next try needs)."""
    shutil.rmtree(tmp, ignore_errors=True)


class CheckpointNotShared(RuntimeError):
    """A process that must read a checkpoint cannot see files another process wrote into it."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def exists(output_dir: str | Path, step: int) -> bool:
    return (checkpoints_dir(output_dir) / step_name(step) / STATE_FILE).exists()


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step`; debris of crashed saves and removals is cleared."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    clear_debris(root)
    tmp = root / f".tmp-{step_name(step)}"
    tmp.mkdir()
    return tmp


def clear_debris(root: Path) -> None:
    """Remove what crashed saves and removals left (`.tmp-…`, `.del-…`): never loaded, never complete."""
    for stale in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def manifest(folder: str | Path) -> dict[str, int]:
    """{path relative to the folder: size} of every file under it (what one process wrote or sees)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def check_visible(seen: dict[str, int], expected: dict[str, int], who: str, folder: str | Path) -> None:
    """Raise `CheckpointNotShared` unless `seen` (a manifest) holds every file of `expected` with its size."""
    missing = sorted(f for f, size in expected.items() if seen.get(f) != size)
    if missing:
        raise CheckpointNotShared(
            f"{who} does not see {len(missing)} of the {len(expected)} checkpoint files under {folder} that the "
            f"learner ranks wrote (e.g. {missing[:3]}): train.output_dir must be on storage that every learner node "
            f"and the driver see (a shared filesystem), or a resume would fail")


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and the folder itself) to stable storage."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write the trainer state last, make it all durable, rename the folder into place, drop all but `keep`."""
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1)
    fsync_tree(tmp)
    root = tmp.parent
    final = root / step_name(step)
    tmp.rename(final)
    _fsync_dir(root)
    for old in complete_checkpoints(root.parent)[:-keep]:
        doomed = root / f".del-{old.name}"
        old.rename(doomed)  # atomic: from here on it is not a complete checkpoint
        _fsync_dir(root)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())
