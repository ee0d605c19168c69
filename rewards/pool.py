"""Rewards that are not trusted to be fast or to return: user code named in the config, and checkers built on
libraries that can take long on odd input (math-verify). They run in a pool of processes, one call per completion,
each with a timeout; a call that times out has its process killed and replaced (pebble), so a slow, hanging or
crashing reward can neither stall nor kill the job. A failed call scores 0 and is counted; `max_failures` failures
in a row of one reward raise `RewardFailed` with its name and the last traceback.

A function is named `package.module:function` or `path/to/file.py:function`. It takes `(completion, gold)` or
`(completion, gold, row)`, where `row` is the dataset row's fields, and returns a number.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import multiprocessing
import numbers
import sys
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable


class RewardFailed(RuntimeError):
    """One reward failed max_failures times in a row: the run stops (a bug in the reward, not bad luck)."""


def load_function(spec: str) -> Callable:
    """The function a spec names; ValueError saying what is wrong (format, missing file or module, no attribute)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ValueError(f"{spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{spec!r}: no file {path}")
        name = f"rlvr_user_reward_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
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


def call(spec: str, completion: str, gold: str, row: dict) -> float:
    """Runs in a pool process: the named function on one completion (loaded once per process)."""
    if spec not in _LOADED:
        fn = load_function(spec)
        _LOADED[spec] = fn, takes_row(fn)
    fn, with_row = _LOADED[spec]
    value = fn(completion, gold, row) if with_row else fn(completion, gold)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"returned {value!r}: a reward must return a finite real number")
    return float(value)


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
        self._pool = ProcessPool(max_workers=self.workers, context=multiprocessing.get_context("spawn"))

    def score(self, name: str, completions: list[str], golds: list[str], rows: list[dict]) -> list[float]:
        """One score per completion; a failed call scores 0.0 and is counted."""
        from pebble import ProcessExpired

        if self._pool is None:
            self._start()
        spec = self.specs[name]
        futures = [self._pool.schedule(call, args=(spec, c, g, r), timeout=self.timeout_s)
                   for c, g, r in zip(completions, golds, rows)]
        out = []
        for future in futures:
            try:
                out.append(future.result())
                self.in_a_row[name] = 0
                continue
            except FutureTimeout:
                cause, trace = f"timed out after {self.timeout_s:g}s (task.reward_timeout_s; its process was " \
                               "killed)", ""
            except ProcessExpired as err:
                cause, trace = f"its process died (exit code {err.exitcode})", ""
            except Exception as err:  # noqa: BLE001 - user code may raise anything; it is reported, not hidden
                cause, trace = f"{type(err).__name__}: {err}", getattr(err, "traceback", "")
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
