"""Ray: connecting, checking that the cluster can hold the job, placing learners and engines, wiring weights.

Learners and engines get placement groups of their own, sized independently: `learner.num_workers` bundles of
{GPU: 1} and `rollout.num_engines` bundles of {GPU: rollout.tensor_parallel_size} (CPUs on a CPU cluster).
Before anything is created the request is checked against the nodes, so a job that cannot fit fails at once
with the shortfall named, instead of waiting forever on a pending placement group.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from core.waits import ActorFault, settle, wait_all
from core.weight_sync import BACKEND_FOR_DEVICE
from rollout.group import is_engine_fault

log = logging.getLogger("rlvr.cluster")
PLACEMENT_TIMEOUT_S = 60.0


class ClusterTooSmall(RuntimeError):
    """The cluster cannot hold the placement groups the config asks for."""


def connect(address: str | None) -> str:
    """Attach to the Ray cluster: the given address, the job's own cluster under `ray job submit`, or a new local
    one (never an unrelated cluster that happens to run on this machine)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1 when starting locally
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}
    if ray.is_initialized():
        return "existing"
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return address
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)  # inside `ray job submit`: the job's runtime env applies
        return "auto"
    ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=True)
    return "local"


def detect_device(requested: str, cfg=None) -> str:
    """`auto` → cuda when the cluster has GPUs, else cpu. A config that asks for cuda on a cluster without GPUs
    fails here, naming what it needs (GPU presets say `train.device: cuda`, so they never quietly run on CPU)."""
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if requested == "cuda" and not has_gpu:
        need = ""
        if cfg is not None:
            learner, rollout = bundles(cfg, "cuda")
            need = (f": GPU: need {sum(b['GPU'] for b in learner + rollout):g} (learner "
                    f"{sum(b['GPU'] for b in learner):g} + rollout {sum(b['GPU'] for b in rollout):g}), cluster has 0")
        raise ClusterTooSmall(f"train.device=cuda but the Ray cluster has no GPU{need}; on a machine without GPUs use "
                              f"a CPU preset (e.g. configs/gsm8k_smollm2_cpu.yaml)")
    if requested == "auto":
        return "cuda" if has_gpu else "cpu"
    return requested


def bundles(cfg, device: str) -> tuple[list[dict], list[dict]]:
    """(learner bundles, rollout bundles) for the config on this device."""
    if device == "cuda":
        learner = [{"CPU": cfg.learner.cpus_per_worker, "GPU": 1}] * cfg.learner.num_workers
        rollout = [{"CPU": cfg.rollout.cpus_per_engine, "GPU": cfg.rollout.tensor_parallel_size}] * cfg.rollout.num_engines
    else:
        if cfg.rollout.tensor_parallel_size != 1:
            raise ClusterTooSmall("rollout.tensor_parallel_size > 1 needs GPUs; this cluster has none")
        learner = [{"CPU": cfg.learner.cpus_per_worker}] * cfg.learner.num_workers
        rollout = [{"CPU": cfg.rollout.cpus_per_engine}] * cfg.rollout.num_engines
    return learner, rollout


def check_fits(learner: list[dict], rollout: list[dict], nodes: list[dict[str, float]]) -> None:
    """Raise ClusterTooSmall, naming the shortfall, when the bundles cannot be packed onto the nodes.

    `nodes` holds each alive node's resources (e.g. {"CPU": 16, "GPU": 8}). Checks totals first, then that each
    bundle fits on some node (a TP=8 engine needs one node with 8 GPUs), then a first-fit packing.
    """
    wanted = learner + rollout
    problems = []
    for res in sorted({k for b in wanted for k in b}):
        need = sum(b.get(res, 0) for b in wanted)
        have = sum(n.get(res, 0) for n in nodes)
        if need > have:
            problems.append(f"{res}: need {need:g} (learner {sum(b.get(res, 0) for b in learner):g} + rollout "
                            f"{sum(b.get(res, 0) for b in rollout):g}), cluster has {have:g}")
    for role, group in (("learner", learner), ("rollout", rollout)):
        for b in group[:1]:
            if not any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes):
                biggest = max((n.get("GPU", 0) for n in nodes), default=0)
                problems.append(f"one {role} bundle {b} fits on no single node (largest node has {biggest:g} GPU)")
    if not problems:
        free = [dict(n) for n in nodes]
        for b in sorted(wanted, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
            node = next((n for n in free if all(n.get(k, 0) >= v for k, v in b.items())), None)
            if node is None:
                problems.append(f"bundles do not pack onto the nodes (no node left for {b}); nodes: {nodes}")
                break
            for k, v in b.items():
                node[k] -= v
    if problems:
        raise ClusterTooSmall("the cluster cannot hold this job:\n  " + "\n  ".join(problems) +
                              "\nlower learner.num_workers / rollout.num_engines / rollout.tensor_parallel_size, or "
                              "add nodes")


def alive_nodes() -> list[dict[str, float]]:
    return [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]]


def place(cfg, device: str, timeout_s: float = PLACEMENT_TIMEOUT_S, learner_too: bool = True):
    """Check, then create and wait for the learner (unless not `learner_too`: None) and rollout placement groups."""
    learner, rollout = bundles(cfg, device)
    learner = learner if learner_too else []
    check_fits(learner, rollout, alive_nodes())
    groups = {"learner": placement_group(learner, strategy="PACK")} if learner else {}
    groups["rollout"] = placement_group(rollout, strategy="PACK")
    start = time.time()
    for name, pg in groups.items():
        if not pg.wait(max(1.0, timeout_s - (time.time() - start))):
            for g in groups.values():
                remove_placement_group(g)
            raise ClusterTooSmall(
                f"the {name} placement group {pg.bundle_specs} was not placed within {timeout_s:.0f}s; "
                f"available now: {ray.available_resources()} (other jobs may hold the rest)")
    return groups.get("learner"), groups["rollout"]


class WeightChannel:
    """Learner rank 0 → every engine worker, surviving its engines. Both sides of each collective are entered from
    one driver call, and every wait is bounded by `timeouts.broadcast_s`.

    `version` is the version of the weights the engines hold; `learner_version` the one the learner holds (ahead by
    one while the learner trains, and in the one-step-off pipeline until the engines end their batch). `lock` is
    held by whoever drives the learner, so that a replacement made while generating in another thread is sent the
    learner's weights between its calls, labelled with their true version.
    When an engine dies or hangs in a sync (or in opening the group), it is replaced in its bundle
    (`EngineGroup.restart`); the group is then closed on every member and a new one opened over the new membership
    on a fresh port, and the weights are sent again. A replacement made while generating comes here too
    (`EngineGroup.after_restart`). Each replacement is then checked against the learner (`verify`). A learner rank
    that fails is not handled here: it raises `ActorFault`, and the driver restarts the job from its checkpoint.
    """

    GRACE_S = 30.0  # beyond the group's own timeout, for the calls to come back

    def __init__(self, learners, engines, device: str, timeout_s: float, verify_prompt: list[int] | None = None):
        self.learners, self.engines = learners, engines
        self.backend, self.timeout_s = BACKEND_FOR_DEVICE[device], timeout_s
        self.plan = learners.weight_plan()
        self.bytes = sum(b.nbytes for b in self.plan)
        self.version = self.learner_version = 0
        self.lock = threading.RLock()
        self.verify_prompt = verify_prompt
        self.checks: list[dict] = []  # one per check of a replacement
        self._recheck: set[int] = set()  # replacements to check again after the next regular sync
        engines.after_restart = self.rejoin
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
                                  self.learners.open_weight_group(self.backend, host, port, world, self.timeout_s),
                                  self.engines.open_weight_group(self.backend, host, port, world, self.timeout_s,
                                                                 self.plan))
            if not failed:
                return

    def _run(self, phase: str, learner_refs: list, engine_refs: list) -> tuple[list, list[int]]:
        """Wait for one call on every member. Returns (the learner ranks' results, engines replaced because they died
        or hung in it); with replacements the caller reopens the group and runs the call again."""
        outcomes = settle(learner_refs + engine_refs, self.timeout_s + self.GRACE_S)
        ours, theirs = outcomes[:len(learner_refs)], outcomes[len(learner_refs):]
        dead = {self.learners.name(r): o.describe(self.timeout_s) for r, o in enumerate(ours)
                if o.status in ("died", "hung")}
        if dead:
            raise ActorFault(phase, dead)
        failed = {i: o.describe(self.timeout_s) for i, o in enumerate(theirs) if is_engine_fault(o)}
        if failed:
            self.engines.restart(failed, phase, resync=False)
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
