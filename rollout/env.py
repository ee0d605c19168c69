"""The environment API of multi-turn rollouts, and the process pool its calls run in.

An environment is a class named in the config (`env.name`: `path/to/file.py:Class`, `package.module:Class`, or a
built-in: `python`). Each pool process builds it once, with `env.args` as keyword arguments, and calls

    step(row, turns) -> Reply

after every model turn that ended on a stop (a stop string or the end-of-sequence token): `row` is the dataset
row's fields, `turns` the model's turns so far as text (the last one is to be answered). It returns a `Reply`: the
observation (text, tokenized alone and appended as is, or token ids), whether the trajectory is done, optionally a
reward (added to the task's rewards of the finished trajectory) and numbers to log (`info`, e.g. tool calls).

It keeps no state between calls: everything it needs is in the row and the turns (calls of one trajectory may run
in different processes, and a process may be replaced at any time). A call that raises, hangs past `env.timeout_s`
or kills its process ends that trajectory (scored 0, counted); `env.max_failures` in a row stop the run with the
environment's name and the last traceback. The same pool as user rewards (`rewards.pool`): pebble, spawned.
"""
from __future__ import annotations

import math
import multiprocessing
import numbers
import os
import time
import traceback
from dataclasses import dataclass, field

from rewards.pool import RESULT_GRACE_S, PoolCallError, load_function, pool_result

BUILTIN = {"python": "rollout.python_tool:PythonTool"}


@dataclass
class Reply:
    observation: str | list[int] = ""  # appended to the trajectory after the model's turn (environment tokens)
    done: bool = False  # True: the trajectory ends with the model's turn (the observation is not appended)
    reward: float | None = None  # added to the finished trajectory's total reward
    info: dict = field(default_factory=dict)  # numbers summed over the trajectory and logged as env/<key>


class EnvironmentFailed(RuntimeError):
    """The environment failed env.max_failures calls in a row: the run stops (a bug in it, not bad luck)."""


def spec_of(name: str) -> str:
    return BUILTIN.get(name, name)


_ENVS: dict[str, object] = {}


def _env(spec: str, args: dict):
    key = spec + repr(sorted(args.items()))
    if key not in _ENVS:
        cls = load_function(spec)
        _ENVS[key] = cls(**args)
    return _ENVS[key]


def check_reply(reply) -> Reply:
    """A `Reply` as the loop needs it; a wrong one raises TypeError saying what is wrong."""
    if not isinstance(reply, Reply):
        raise TypeError(f"step() returned {type(reply).__name__}: it must return rollout.env.Reply")
    obs = reply.observation
    if not isinstance(obs, str) and not (isinstance(obs, list) and all(isinstance(t, int) for t in obs)):
        raise TypeError(f"Reply.observation must be text or a list of token ids, got {type(obs).__name__}")
    if reply.reward is not None and (not isinstance(reply.reward, numbers.Real) or not math.isfinite(reply.reward)):
        raise TypeError(f"Reply.reward must be a finite number or None, got {reply.reward!r}")
    for k, v in reply.info.items():
        if not isinstance(v, numbers.Real):
            raise TypeError(f"Reply.info[{k!r}] must be a number, got {v!r}")
    return reply


def start_worker(spec: str, args: dict) -> None:
    """Pool process start: its own session (a signal to the job's process group leaves calls in flight alone), the
    environment built before the first call's timeout runs."""
    os.setsid()
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        _env(spec, args)
    except Exception:  # noqa: BLE001 - reported by the first call, with its traceback
        pass


def call(spec: str, args: dict, row: dict, turns: list[str]) -> Reply:
    """Runs in a pool process: one step of the environment."""
    try:
        return check_reply(_env(spec, args).step(row, turns))
    except BaseException as err:  # noqa: BLE001 - whatever user code raises comes back as one type
        raise PoolCallError(f"{type(err).__name__}: {err}", traceback.format_exc()) from None


class EnvPool:
    """An environment's calls in `cfg.workers` processes, each with `cfg.timeout_s`; failures counted in a row."""

    def __init__(self, cfg):
        from pebble import ProcessPool

        self.cfg, self.spec = cfg, spec_of(cfg.name)
        load_function(self.spec)  # a spec that names nothing fails here, before any process starts
        self.in_a_row = 0
        self.pool = ProcessPool(max_workers=cfg.workers, context=multiprocessing.get_context("spawn"),
                                initializer=start_worker, initargs=(self.spec, dict(cfg.args)))

    def submit(self, row: dict, turns: list[str]):
        future = self.pool.schedule(call, args=(self.spec, dict(self.cfg.args), row, turns), timeout=self.cfg.timeout_s)
        future.started_at = time.monotonic()
        return future

    def result(self, future) -> tuple[Reply | None, str]:
        """The call's reply, or (None, why it failed). Raises `EnvironmentFailed` at env.max_failures in a row."""
        reply, cause, trace = pool_result(future, self.cfg.timeout_s + RESULT_GRACE_S, self.cfg.timeout_s,
                                          "env.timeout_s")
        if not cause:
            self.in_a_row = 0
            return reply, ""
        self.in_a_row += 1
        if self.in_a_row >= self.cfg.max_failures:
            raise EnvironmentFailed(f"environment {self.cfg.name!r} ({self.spec}) failed {self.in_a_row} calls in a "
                                    f"row (env.max_failures={self.cfg.max_failures}); last failure: {cause}"
                                    + (f"\n{trace}" if trace else ""))
        return None, cause

    def close(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=10)
