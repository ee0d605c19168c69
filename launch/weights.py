"""The weight channel: learner rank 0 → every engine worker, over a collective group (NCCL on GPUs, gloo on CPU)
that is rebuilt around replaced engines. The buckets and the receive side are in `core.weight_sync` and
`rollout.worker_extension`; docs/weight-protocol.md has the protocol."""
from __future__ import annotations

import logging
import threading
import time

from core.types import Sample
from core.waits import ActorFault, settle, wait_all
from core.weight_sync import BACKEND_FOR_DEVICE
from rollout.group import EnginesReplaced, StallWatch, is_engine_fault

log = logging.getLogger("rlvr.weights")


class WeightChannel:
    """Learner rank 0 → every engine worker, surviving its engines. Both sides of each collective are entered from
    one driver call, and every wait is bounded by `timeouts.broadcast_s`; an engine that stops answering is found
    within `timeouts.stall_s` (`rollout.group.StallWatch`).

    `version` is the version of the weights the engines hold; `learner_version` the one the learner holds (ahead by
    one while the learner trains, and in the one-step-off pipeline until the engines end their batch). `lock` is
    held by whoever drives the learner, so that a replacement made while generating in another thread is sent the
    learner's weights between its calls, labelled with their true version.
    When an engine dies or hangs in a sync (or in opening the group), it is replaced in its bundle
    (`EngineGroup.restart`); the group is then closed on every member and a new one opened over the new membership
    on a fresh port, and the weights are sent again. Rollouts generate through `generate`, which does the same for
    an engine replaced while generating (`EnginesReplaced`). Each replacement is then checked against the learner
    (`verify`). A learner rank that fails is not handled here: it raises `ActorFault`, and the driver restarts the
    job from its checkpoint.
    """

    GRACE_S = 30.0  # beyond the group's own timeout, for the calls to come back

    def __init__(self, learners, engines, device: str, timeout_s: float, verify_prompt: list[int] | None = None):
        self.learners, self.engines = learners, engines
        self.backend, self.timeout_s = BACKEND_FOR_DEVICE[device], timeout_s
        # The group's own timeout, for its rendezvous and for each bucket's collective: no bytes through it for this
        # long, and every member's call raises (a stopped member found by the stall watch is killed, and the members
        # waiting on it are freed within timeouts.stall_s, not broadcast_s).
        self.group_timeout_s = min(timeout_s, engines.timeouts.stall_s)
        self.plan = learners.weight_plan()
        self.bytes = sum(b.nbytes for b in self.plan)
        self.version = self.learner_version = 0
        self.lock = threading.RLock()
        self.verify_prompt = verify_prompt
        self.checks: list[dict] = []  # one per check of a replacement
        self._recheck: set[int] = set()  # replacements to check again after the next regular sync
        self._reopen()

    def sync(self, version: int) -> dict:
        """Send the learner's weights, as `version`, to every engine."""
        start = time.perf_counter()
        with self.lock:
            self.version = self.learner_version = version
            recheck, self._recheck = sorted(self._recheck), set()
            results = self._send()
            self.verify(recheck)  # replacements follow the learner through ordinary syncs too
        return {"broadcast_seconds": time.perf_counter() - start, "broadcast_bytes": results[0]["bytes"]}

    def generate(self, prompts: list[list[int]], n: int, **sampling) -> list[list[Sample]]:
        """`EngineGroup.generate`, with engines replaced on the way given the learner's weights before the prompts
        they held are generated again."""
        resume = None
        while True:
            try:
                return self.engines.generate(prompts, n, resume=resume, **sampling)
            except EnginesReplaced as replaced:
                self.rejoin(replaced.engines)
                resume = replaced

    def rejoin(self, replaced: list[int]) -> None:
        """Engines were replaced (while generating): a new group over the new membership, and the learner's current
        weights to every engine (they are all idle between generate rounds)."""
        with self.lock:
            self.version = self.learner_version
            self._reopen()
            self._send(replaced)

    def _send(self, replaced: list[int] | None = None) -> list:
        replaced = list(replaced or [])
        while True:
            results, failed = self._run("weight sync", self.learners.broadcast_weights(self.version),
                                        self.engines.receive_weights(self.version))
            if not failed:
                break
            replaced += failed
            self._reopen()
        self.engines.recovered()
        self.verify(sorted(set(replaced)))
        self._recheck |= set(replaced)
        return results

    def _reopen(self) -> None:
        """Close the group on every member, then open a new one on a fresh port (the sender picks it)."""
        while True:
            _, failed = self._run("weight group close", self.learners.close_weight_group(),
                                  self.engines.close_weight_group())
            if failed:
                continue
            host, port = self.learners.sender_address()
            world = 1 + self.engines.num_workers
            _, failed = self._run("weight group open",
                                  self.learners.open_weight_group(self.backend, host, port, world,
                                                                  self.group_timeout_s),
                                  self.engines.open_weight_group(self.backend, host, port, world,
                                                                 self.group_timeout_s, self.plan))
            if not failed:
                return

    def _run(self, phase: str, learner_refs: list, engine_refs: list) -> tuple[list, list[int]]:
        """Wait for one call on every member. Returns (the learner ranks' results, engines replaced because they died
        or hung in it); with replacements the caller reopens the group and runs the call again."""
        watch = StallWatch(self.engines, {len(learner_refs) + i: i for i in range(len(engine_refs))}, collective=True)
        outcomes = settle(learner_refs + engine_refs, self.timeout_s + self.GRACE_S, watch)
        ours, theirs = outcomes[:len(learner_refs)], outcomes[len(learner_refs):]
        dead = {self.learners.name(r): o.describe(self.timeout_s) for r, o in enumerate(ours)
                if o.status in ("died", "hung")}
        if dead:
            raise ActorFault(phase, dead)
        failed = {i: o.describe(self.timeout_s) for i, o in enumerate(theirs) if is_engine_fault(o)}
        if failed:
            self.engines.restart(failed, phase)
            return [], list(failed)
        errors = [o.error for o in outcomes if o.status == "error"]
        if errors:
            raise errors[0]
        return [o.value for o in ours], []

    def verify(self, engines: list[int]) -> None:
        """Check replacements against the learner with real work: an engine's greedy tokens and their logprobs must
        be the learner's argmax tokens and logprobs (stale or corrupt weights show at once). Recorded in `checks`;
        a disagreement is logged loudly (bf16 engines may differ from the learner in near-ties)."""
        if not self.verify_prompt:
            return
        for i in engines:
            ref = self.engines.engines[i].generate.remote([self.verify_prompt], 1, 0.0, 1.0, 16)
            [[[sample]]] = wait_all([ref], [self.engines.name(i)], "replacement check",
                                    self.engines.timeouts.generate_s)
            if not sample.completion_ids:
                continue
            mine = self.learners.score(sample.prompt_ids, sample.completion_ids, 1.0)
            check = {"engine": i, "version": sample.weight_version,
                     "greedy_match": mine["argmax"] == sample.completion_ids,
                     "max_abs_logprob_diff": max(abs(a - b) for a, b in zip(mine["logprobs"], sample.logprobs))}
            self.checks.append(check)
            say = log.info if check["greedy_match"] and check["max_abs_logprob_diff"] < 0.1 else log.warning
            say(f"{self.engines.name(i)} checked against the learner at weight version {check['version']}: greedy "
                f"tokens {'match' if check['greedy_match'] else 'DIFFER'}, max |Δ logprob| "
                f"{check['max_abs_logprob_diff']:.2e}")
