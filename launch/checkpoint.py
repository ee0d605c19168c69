"""Checkpoint folders: written under a temporary name and renamed into place only when complete.

    output_dir/checkpoints/step-000040/{deepspeed/…, trainer_state.json}

A crash at any point while saving leaves at most a `.tmp-step-…` folder, which is never loaded and is removed
by the next save; the previous `step-…` folder stays loadable. On a multi-node cluster `output_dir` must be on a
filesystem that every learner node sees.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"


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


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step`; stale temporaries of crashed saves are removed."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_name(step)}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write the trainer state last, rename the folder into place, then drop all but the newest `keep`."""
    state_path = tmp / STATE_FILE
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = tmp.parent / step_name(step)
    if final.exists():  # re-saving a step (e.g. the final save after a periodic one): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())
