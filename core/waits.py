"""Bounded waits on Ray calls: every wait of the driver ends, with the results or with an error that names the
phase and the actors, never a silent hang.

Two kinds of trouble are told apart, because the job answers them differently:
- an *actor fault*: the actor died (killed, OOM, node lost: Ray's `RayActorError`) or did not answer within the
  phase's timeout (hung, stopped). Engines are then replaced; a learner fault restarts the job from its checkpoint.
- an *error raised inside a call* (a bad input, a NaN abort): re-raised as it is; no restart fixes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

DEAD = (RayActorError, ActorUnavailableError)  # RayActorError is the parent of ActorDiedError


class ActorFault(RuntimeError):
    """Actors died or hung during a phase. `actors` maps each actor's name to what happened to it."""

    def __init__(self, phase: str, actors: dict[str, str]):
        self.phase, self.actors = phase, actors
        super().__init__(f"{phase}: " + "; ".join(f"{name} {what}" for name, what in actors.items()))


POLL_S = 5.0  # how often `settle` asks its `stalled` watcher, at most (a watcher may ask more often: `every_s`)


@dataclass
class Outcome:
    """How one call ended: "ok" (with its value), "error" (raised inside the call), "died" or "hung" (with `why`
    when a watcher found it before the deadline)."""

    status: str
    value: Any = None
    error: BaseException | None = None
    why: str = ""

    def describe(self, timeout_s: float) -> str:
        if self.status == "hung":
            return self.why or f"did not answer within {timeout_s:.0f}s (hung or stopped)"
        if self.status == "died":
            return f"died ({type(self.error).__name__}: {first_line(self.error)})"
        return f"raised {type(self.error).__name__}: {first_line(self.error)}"


def first_line(err: BaseException | None) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:300] if text else ""


def settle(refs: list, timeout_s: float,
           stalled: Callable[[list[int]], dict[int, str]] | None = None) -> list[Outcome]:
    """Wait for every call until they all end or the deadline passes; never raises. Calls still running at the
    deadline are "hung". `stalled`, asked every POLL_S (or its `every_s`) with the indices of the calls still
    running, names those that are hung already (index → why): they are "hung" at once, and the wait goes on for the
    others."""
    outcomes: list[Outcome | None] = [None] * len(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        left = max(0.0, deadline - time.monotonic())
        every_s = getattr(stalled, "every_s", POLL_S)
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, every_s) if stalled else left)
        for ref in ready:
            outcomes[index[ref]] = _outcome(ref)
        if not ready and time.monotonic() >= deadline:
            break
        if stalled and pending:
            for i, why in stalled([index[ref] for ref in pending]).items():
                outcomes[i] = Outcome("hung", why=why)
            pending = [ref for ref in pending if outcomes[index[ref]] is None]
    return [o if o is not None else Outcome("hung") for o in outcomes]


def _outcome(ref) -> Outcome:
    try:
        return Outcome("ok", ray.get(ref, timeout=0))
    except DEAD as err:
        return Outcome("died", error=err)
    except Exception as err:  # noqa: BLE001 - the caller decides what an error inside a call means
        return Outcome("error", error=err)


def wait_all(refs: list, names: list[str], phase: str, timeout_s: float, grace_s: float = 10.0) -> list:
    """The results of every call, in order, or an error.

    An actor death raises `ActorFault` at once. An error raised inside a call is re-raised, after a short grace in
    which the other calls may reveal a dead actor behind it (a rank whose peer died fails in its collective first):
    the dead actor is then the error reported. Calls still running after `timeout_s` raise `ActorFault` naming them.
    """
    assert len(refs) == len(names)
    outcomes: list[Outcome | None] = [None] * len(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    pending, deadline = list(refs), time.monotonic() + timeout_s
    first_error: BaseException | None = None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        for ref in ready:
            o = outcomes[index[ref]] = _outcome(ref)
            if o.status == "died":
                raise ActorFault(phase, {names[index[ref]]: o.describe(timeout_s)}) from o.error
            if o.status == "error" and first_error is None:
                first_error = o.error
                deadline = min(deadline, time.monotonic() + grace_s)
    if first_error is not None:
        raise first_error
    hung = {names[i]: Outcome("hung").describe(timeout_s) for i, o in enumerate(outcomes) if o is None}
    if hung:
        raise ActorFault(phase, hung)
    return [o.value for o in outcomes]
