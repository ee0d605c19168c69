"""The supervisor: the whole job's faults, its stop signals and its in-job restarts. `supervise` runs one attempt
of the job after another: when the machinery fails (an actor dies or hangs, a collective breaks), the attempt's
actors are gone and the next resumes from the latest complete checkpoint, up to train.max_restarts times."""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from ray.exceptions import ActorUnavailableError, NodeDiedError, ObjectLostError, RayActorError, RaySystemError

from core.waits import ActorFault
from launch import checkpoint
from launch.config import Config, dump_config
from launch.driver import DRIVER_LOST_ENV, DRIVER_RESTARTS_ENV
from launch.outputs import OutputLock

log = logging.getLogger("rlvr")

# Failures of the machinery, not of the config or the math: the job restarts from its checkpoint (train.max_restarts).
INFRA_FAULTS = (ActorFault, TimeoutError, torch.distributed.DistError, RayActorError, ActorUnavailableError,
                ObjectLostError, NodeDiedError, RaySystemError)


class StopRequested(Exception):
    """SIGTERM or SIGINT reached the job, which stopped at a step boundary after writing a checkpoint."""


class RestartsExhausted(RuntimeError):
    """The machinery failed again after train.max_restarts in-job restarts."""


@dataclass
class Faults:
    """What went wrong over the whole job, across its in-job restarts."""

    job_restarts: int = 0
    driver_restarts: int = field(default_factory=lambda: int(os.environ.get(DRIVER_RESTARTS_ENV, 0)))  # by the
    # entry point (`launch.driver`): drivers of this job that died before this one
    steps_recomputed: int = 0
    checkpoint_failures: int = 0  # checkpoints skipped under ckpt.on_error=continue
    engine_restarts: int = 0  # engines replaced in earlier attempts (the current EngineGroup counts its own)
    last_step: int = 0  # the last step logged
    failed_at: float | None = field(default_factory=lambda: float(os.environ[DRIVER_LOST_ENV])
                                    if DRIVER_LOST_ENV in os.environ else None)  # when the last failure was
    # noticed: an in-job restart began, or the last driver was lost (time.monotonic: one clock for the whole host)
    recover_seconds: float | None = None  # failure → actors up and the checkpoint loaded, reported once

    def after_driver_loss(self, rows: list[dict], resume_step: int) -> None:
        """This driver replaces one that died: carry on its counters from its last logged row, and count the steps
        it had done since the checkpoint, and the one in flight, as computed again."""
        if rows:
            last = rows[-1]
            self.steps_recomputed = int(last.get("steps_recomputed", 0)) + last["step"] + 1 - resume_step
            self.job_restarts, self.engine_restarts = int(last.get("job_restarts", 0)), \
                self.engine_restarts + int(last.get("engine_restarts", 0))
        self.last_step = resume_step
        if rows:
            self.checkpoint_failures = int(rows[-1].get("checkpoint_failures", 0))
        log.warning(f"driver restart {self.driver_restarts}: resumed at step {resume_step}; "
                    f"{self.steps_recomputed} step(s) computed again so far")

    def recovered(self) -> None:
        """The attempt after a failure has its actors up and its checkpoint loaded."""
        if self.failed_at is not None:
            self.recover_seconds, self.failed_at = time.monotonic() - self.failed_at, None
            log.warning(f"recovered in {self.recover_seconds:.1f}s (in-job restart {self.job_restarts}, driver "
                        f"restart {self.driver_restarts})")

    def row(self, engines, channel, seen: list[int]) -> dict:
        """Restart counters (whole job) and the recoveries ended since the last row (`seen` counts the attempt's
        engine restarts and replacement checks already logged; a replacement still recovering in the rollout thread
        waits for the next row): their seconds, how replacements checked out against the learner ("numbers", for
        every sink), and each replacement's record (metrics.jsonl only)."""
        new = list(itertools.takewhile(lambda r: "seconds" in r, engines.restarts[seen[0]:]))
        checks = channel.checks[seen[1]:]
        seen[0], seen[1] = seen[0] + len(new), seen[1] + len(checks)
        numbers = {"engine_restarts": self.engine_restarts + len(engines.restarts), "job_restarts": self.job_restarts,
                   "driver_restarts": self.driver_restarts, "steps_recomputed": self.steps_recomputed,
                   "checkpoint_failures": self.checkpoint_failures,
                   "recover_seconds": sum(r.get("seconds", 0.0) for r in new)}
        if self.recover_seconds is not None:
            numbers["job_recover_seconds"], self.recover_seconds = self.recover_seconds, None
        if checks:
            numbers["replacement_greedy_match"] = float(all(c["greedy_match"] for c in checks))
            numbers["replacement_max_abs_logprob_diff"] = max(c["max_abs_logprob_diff"] for c in checks)
        out = {"numbers": numbers}
        if new:
            out["restarts"] = [{k: v for k, v in r.items() if k != "start"} for r in new]
        if checks:
            out["replacement_checks"] = checks
        return out


class StopSignals:
    """SIGTERM and SIGINT (`ray job stop`, a preempted node, Ctrl-C) only raise a flag; the loop writes a checkpoint
    at the end of the step and exits with `launch.exits.STOPPED`. A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested: str | None = None
        self._saved: dict = {}
        self._at = 0.0

    REPEAT_S = 1.0  # one Ctrl-C reaches both the entry point and the driver, which then passes it on too

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            if time.monotonic() - self._at < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        log.warning(f"{self.requested} received: stopping after this step, with a checkpoint")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def supervise(cfg: Config, out: Path, attempt: Callable[[StopSignals, Faults], dict]) -> dict:
    """Hold the output dir, catch the stop signals, and run `attempt` until it returns; after a failure of the
    machinery, run it again (it resumes from the latest checkpoint): at most ckpt.every steps are computed again per
    restart."""
    faults = Faults()
    with OutputLock(out), StopSignals() as stop:
        (out / "config.yaml").write_text(dump_config(cfg))
        while True:
            try:
                return attempt(stop, faults)
            except INFRA_FAULTS as err:
                latest = checkpoint.latest_checkpoint(out)
                resume_step = checkpoint.read_state(latest)["step"] if latest else 0
                if faults.job_restarts >= cfg.train.max_restarts:
                    raise RestartsExhausted(f"{type(err).__name__}: {err}\nafter {faults.job_restarts} in-job "
                                            f"restart(s) (train.max_restarts={cfg.train.max_restarts})") from err
                redo = faults.last_step + 1 - resume_step  # the steps done since the checkpoint and the one in flight
                faults.job_restarts, faults.steps_recomputed = faults.job_restarts + 1, faults.steps_recomputed + redo
                faults.failed_at = time.monotonic()
                log.warning(f"{type(err).__name__}: {err}\nrestart {faults.job_restarts}/{cfg.train.max_restarts}: "
                            f"every actor torn down; resuming from {latest.name if latest else 'the start'}: steps "
                            f"{resume_step + 1}-{faults.last_step + 1} are computed again")
