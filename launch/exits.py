"""The exit codes of the entry points (`launch/gsm8k.py`, `launch/evaluate.py`), in one table.

    0   done (or stopped by train.stop_after)
    1   failed: an error that restarts could not fix, with its message
    2   the config, the model, the cluster or the output dir cannot be used: nothing was trained
    70  crashed: an error nothing expected (a bug), traceback printed; `launch/gsm8k.py` starts the driver again
        from its checkpoint (`launch.driver`, train.max_restarts times) (sysexits EX_SOFTWARE)
    75  stopped by SIGTERM or SIGINT (`ray job stop`, a preempted node) after writing a checkpoint: submit the same
        command again to continue (sysexits EX_TEMPFAIL)
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from launch.driver import CRASHED  # noqa: F401 - in the table

OK, FAILED, UNUSABLE, STOPPED = 0, 1, 2, 75


def unusable() -> tuple[type, ...]:
    """Errors that mean the job could not start as asked (exit 2)."""
    from launch.cluster import ClusterTooSmall
    from launch.config import ConfigError
    from launch.outputs import OutputDirLocked

    return ConfigError, ClusterTooSmall, FileNotFoundError, FileExistsError, OutputDirLocked


def failures() -> tuple[type, ...]:
    """Errors that ended a job that had started (exit 1), with a message that says why."""
    from launch.checkpoint import CheckpointNotShared, CheckpointWriteFailed
    from launch.metrics import MetricsNotWritten
    from launch.supervisor import RestartsExhausted
    from rewards import RewardFailed
    from rollout.env import EnvironmentFailed
    from rollout.group import EngineRestartsExhausted

    return (RestartsExhausted, EngineRestartsExhausted, CheckpointNotShared, CheckpointWriteFailed, MetricsNotWritten,
            RewardFailed, EnvironmentFailed)


def run_job(job: Callable[[], object]) -> int:
    """Run `job` and map how it ended to the table above, printing the error in one message (no traceback for the
    errors the table names)."""
    from launch.supervisor import StopRequested

    try:
        job()
    except unusable() as err:
        print(f"error: {err}", file=sys.stderr)
        return UNUSABLE
    except StopRequested as err:
        print(f"[rlvr] {err}", flush=True)
        return STOPPED
    except failures() as err:
        print(f"error: {getattr(err, 'cause', None) or err}", file=sys.stderr)  # raised in an actor: its own message
        return FAILED
    except Exception:  # noqa: BLE001 - anything else is a bug: its traceback, and the watching entry point restarts
        traceback.print_exc()
        sys.stderr.flush()
        return CRASHED
    return OK
