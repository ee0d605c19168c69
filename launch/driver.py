"""The entry point keeps its driver alive. `launch/gsm8k.py`, the command `ray job submit` runs, does not train in
its own process: it starts the driver (the same command, as a child process that connects to Ray and runs the
loop) and waits for it. A driver that is killed (kill -9, the OOM killer) or crashes on an unexpected error (exit
code 70, its traceback printed) is started again, and resumes from the latest checkpoint in the same Ray job, up to
train.max_restarts times; its actors, which Ray kills with their driver, are made sure of first
(`launch.actors.reap_leftovers`). Every other exit code (`launch.exits`) is the job's: done, failed (a reward bug,
restarts exhausted), unusable config, stopped by a signal. SIGTERM, SIGINT and SIGHUP are passed on to the driver,
which stops at a step boundary with a checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

DRIVER_RESTARTS_ENV = "RLVR_DRIVER_RESTARTS"  # set in a driver: how many drivers of this job died before it
DRIVER_LOST_ENV = "RLVR_DRIVER_LOST_AT"  # set in a restarted driver: when the last one was lost (time.monotonic)
CRASHED = 70  # sysexits EX_SOFTWARE: the driver raised an error nothing expected (launch.exits.run_job)
RESTART_PAUSE_S = 2.0


def is_driver() -> bool:
    """Whether this process is a driver that `watch` started (and so must train, not start another)."""
    return DRIVER_RESTARTS_ENV in os.environ


def how_it_ended(code: int) -> str | None:
    """Why a driver's exit code calls for a restart, or None when the code is the job's own answer."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == CRASHED:
        return "crashed (its traceback is above)"
    return None


def watch(argv: list[str], max_restarts: int) -> int:
    """Run the driver (`launch/gsm8k.py` with `argv`) until it ends with the job's own exit code; start it again
    after a kill or a crash, at most `max_restarts` times. Returns the exit code for `ray job submit`."""
    entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k.py")
    restarts, lost_at, stopping, child = 0, None, [], None

    def pass_on(signum, frame):  # noqa: ARG001 - a stop: the driver ends its step with a checkpoint (SIGHUP too)
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # for the whole watch, restart pauses included
        signal.signal(s, pass_on)
    while True:
        env = {**os.environ, DRIVER_RESTARTS_ENV: str(restarts)}
        if lost_at is not None:
            env[DRIVER_LOST_ENV] = repr(lost_at)
        # a restarted driver resumes whatever train.resume said (a run killed mid-way has checkpoints to resume)
        extra = ["train.resume=auto"] if restarts else []
        child = subprocess.Popen([sys.executable, entry, *argv, *extra], env=env)
        code = child.wait()
        why = how_it_ended(code)
        if why is None or stopping:
            return code if code >= 0 else 1
        lost_at = time.monotonic()
        if restarts >= max_restarts:
            print(f"error: the driver (pid {child.pid}) {why}, and train.max_restarts={max_restarts} driver "
                  f"restart(s) are spent", file=sys.stderr, flush=True)
            return 1
        restarts += 1
        print(f"[rlvr] the driver (pid {child.pid}) {why}: starting it again from the latest checkpoint "
              f"(driver restart {restarts}/{max_restarts})", flush=True)
        time.sleep(RESTART_PAUSE_S)
