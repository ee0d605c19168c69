"""Rewards that are not trusted to be fast or to return: user code named in the config, and checkers built on
libraries that can take long on odd input (math-verify). They run in a pool of processes, one call per completion,
each with a timeout; a call that times out has its process killed and replaced (pebble), so a slow, hanging or
crashing reward can neither stall nor kill the job. A failed call scores 0 and is counted; `max_failures` failures
in a row of one reward raise `RewardFailed` with its name and the last traceback.

A function is named `package.module:function` or `path/to/file.py:function`. It takes `(completion, gold)` or
`(completion, gold, row)`, where `row` is the dataset row's fields, and returns a number (a bool counts as 0/1).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import numbers
import os
import sys
import traceback
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable

RESULT_GRACE_S = 60.0  # beyond the per-call timeout: a result that never comes back is a failure, never a hang


class RewardFailed(RuntimeError):
    """One reward failed max_failures times in a row: the run stops (a bug in the reward, not bad luck)."""


class PoolCallError(Exception):
    """A pool call of user code (a reward, an environment) raised: args are (the error as one line, its traceback).
    Sent back instead of the user's own exception, whose class the job's process may not be able to import."""


def pool_result(future, wait_s: float, timeout_s: float, setting: str) -> tuple[object, str, str]:
    """A pool call's outcome: (its value, "", "") or (None, why it failed, the traceback if any). `setting` names the
    timeout's config key for the message."""
    from pebble import ProcessExpired

    try:
        return future.result(timeout=wait_s), "", ""
    except PoolCallError as err:
        return None, *err.args
    except FutureTimeout:
        return None, f"timed out after {timeout_s:g}s ({setting}; its process was killed)", ""
    except ProcessExpired as err:
        return None, f"its process died (exit code {err.exitcode})", ""
    except Exception as err:  # noqa: BLE001 - the pool's own failure: reported, not hidden
        return None, f"{type(err).__name__}: {err}", getattr(err, "traceback", "")


def load_function(spec: str) -> Callable:
    """The function a spec names; ValueError saying what is wrong (format, missing file or module, no attribute)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ValueError(f"{spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{spec!r}: no file {path}")
        name = "rlvr_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except BaseException as err:
                del sys.modules[name]
                if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: not a bug in the file
                    raise
                # a bug in the user's file (SyntaxError, an import it lacks, ...): say which
                raise ValueError(f"{spec!r}: importing {path} raised {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"{spec!r}: cannot import {target!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {target} has no function {attr!r}")
    return fn


def takes_row(fn: Callable) -> bool:
    """Whether `fn` accepts a third argument (the row's fields)."""
    try:
        inspect.signature(fn).bind("completion", "gold", {})
        return True
    except (TypeError, ValueError):
        return False


_LOADED: dict[str, tuple[Callable, bool]] = {}


def _load(spec: str) -> tuple[Callable, bool]:
    if spec not in _LOADED:
        fn = load_function(spec)
        _LOADED[spec] = fn, takes_row(fn)
    return _LOADED[spec]


def start_worker(specs: list[str]) -> None:
    """Pool process start: its own session, so that a signal to the job's process group (`ray job stop`, Ctrl-C)
    does not kill calls in flight (the process still exits with the job: pebble watches its parent), and every
    function loaded before the first call's timeout runs."""
    os.setsid()
    for spec in specs:
        try:
            _load(spec)
        except Exception:  # noqa: BLE001 - reported by the first call, with its traceback
            pass


def call(spec: str, completion: str, gold: str, row: dict) -> float:
    """Runs in a pool process: the named function on one completion."""
    try:
        fn, with_row = _load(spec)
        value = fn(completion, gold, row) if with_row else fn(completion, gold)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"returned {value!r}: a reward must return a finite real number")
        return float(value)
    except BaseException as err:  # noqa: BLE001 - whatever user code raises, even SystemExit, comes back as one type
        raise PoolCallError(f"{type(err).__name__}: {err}", traceback.format_exc()) from None


class RewardPool:
    """Scores completions with named functions in `workers` processes; counts failures per reward."""

    def __init__(self, specs: dict[str, str], workers: int, timeout_s: float, max_failures: int):
        self.specs, self.workers, self.timeout_s, self.max_failures = specs, workers, timeout_s, max_failures
        self.failures = {name: 0 for name in specs}  # over the run
        self.in_a_row = {name: 0 for name in specs}
        self._pool = None

    def _start(self):
        from pebble import ProcessPool

        # spawn: the job's process holds threads (Ray, the rollout thread); a forked child could inherit a held lock.
        self._pool = ProcessPool(max_workers=self.workers, context=multiprocessing.get_context("spawn"),
                                 initializer=start_worker, initargs=(sorted(set(self.specs.values())),))

    def score(self, name: str, completions: list[str], golds: list[str], rows: list[dict]) -> list[float]:
        """One score per completion; a failed call scores 0.0 and is counted."""
        if self._pool is None:
            self._start()
        spec = self.specs[name]
        futures = [self._pool.schedule(call, args=(spec, c, g, r), timeout=self.timeout_s)
                   for c, g, r in zip(completions, golds, rows)]
        out = []
        for future in futures:
            value, cause, trace = pool_result(future, 2 * self.timeout_s + RESULT_GRACE_S,  # queued behind one call
                                              self.timeout_s, "task.reward_timeout_s")
            if not cause:
                out.append(value)
                self.in_a_row[name] = 0
                continue
            out.append(0.0)
            self.failures[name] += 1
            self.in_a_row[name] += 1
            if self.in_a_row[name] >= self.max_failures:
                for f in futures:
                    f.cancel()
                raise RewardFailed(f"reward {name!r} ({spec}) failed {self.in_a_row[name]} times in a row "
                                   f"(task.reward_max_failures={self.max_failures}); last failure: {cause}"
                                   + (f"\n{trace}" if trace else ""))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10)
            self._pool = None
