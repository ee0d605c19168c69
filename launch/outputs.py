"""Where a run writes, and the rule that only one run writes there at a time.

**Where.** An absolute `train.output_dir` is used as it is. A relative one is resolved against `$RLVR_OUTPUT_ROOT`
when that is set; otherwise against the directory the job was started from, except under
`ray job submit --working-dir`, where that directory is Ray's temporary copy of the code (it changes with every
code edit, so a resubmitted run would silently start over): there the root is `~/rlvr`. The driver prints the
absolute path at start. On several nodes, use an absolute path on storage every node sees.

**One writer.** `<output_dir>/.rlvr.lock` names the run that holds the folder: host, pid, process start time,
Ray job id. The holder touches it every `HEARTBEAT_S` seconds. A second run on the same folder fails with a clear
error while the holder lives; a lock whose process is gone (same host) or whose heartbeat is older than
`STALE_S` (another host) is stale and is taken over.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("rlvr.outputs")

LOCK_FILE = ".rlvr.lock"


class OutputDirLocked(RuntimeError):
    """Another live run holds this output dir."""


def in_ray_working_dir(cwd: Path) -> bool:
    """Is `cwd` Ray's unpacked copy of a job's `--working-dir` (`…/working_dir_files/_ray_pkg_*`)?"""
    return any(part == "working_dir_files" for part in cwd.parts) and any(p.startswith("_ray_pkg_") for p in cwd.parts)


def resolve_output_dir(path: str, cwd: Path | None = None, env: dict | None = None) -> Path:
    """The absolute output dir for `train.output_dir` (see the module docstring for the rule)."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if env.get("RLVR_OUTPUT_ROOT"):
        return Path(env["RLVR_OUTPUT_ROOT"]).expanduser().absolute() / p
    if in_ray_working_dir(cwd):
        return Path(env.get("HOME") or Path.home()) / "rlvr" / p
    return cwd / p


def ray_job_id() -> str | None:
    """The submission id of the Ray job this process is the driver of, if any."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, ValueError, TypeError):
        return None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a live process from a reused pid); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    """This process as {host, pid, start}: what `alive_on_this_host` tells apart later from a reused pid."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def alive_on_this_host(holder: dict) -> bool | None:
    """Whether a process recorded by `this_process` still runs; None when it was recorded on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    start = process_start(int(holder.get("pid", -1)))
    return start is not None and start == holder.get("start")


class OutputLock:
    HEARTBEAT_S = 15.0
    STALE_S = 120.0

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.me = {**this_process(), "job_id": ray_job_id(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder_alive(self, holder: dict, age_s: float) -> bool:
        here = alive_on_this_host(holder)
        return age_s < self.STALE_S if here is None else here

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            break
        self._thread = threading.Thread(target=self._heartbeat, name="rlvr-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _check_holder(self) -> None:
        """Raise if the lock's holder lives; otherwise move the stale lock aside (only one contender wins that)."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        try:
            holder = json.loads(text)
        except ValueError:  # written halfway by a process that died: stale once it stops changing
            holder = {}
            if age < 5:
                time.sleep(1)
                return
        if self.holder_alive(holder, age):
            raise OutputDirLocked(
                f"{self.path.parent} is in use by another run: host {holder.get('host')}, pid {holder.get('pid')}, "
                f"Ray job {holder.get('job_id') or '-'}, since {holder.get('since')} (lock heartbeat {age:.0f}s ago). "
                f"Stop that run, or give this one another train.output_dir.")
        log.warning(f"taking over the stale lock of {self.path.parent} (held by host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, Ray job {holder.get('job_id') or '-'}, no longer running)")
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        if aside.read_text() != text:  # a contender had already taken over: that lock is live, put it back
            os.rename(aside, self.path)
            return
        aside.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
