"""Ray: connecting, checking that the cluster can hold the job, placing learners and engines.

Learners and engines get placement groups of their own, sized independently: `learner.num_workers` bundles of
{GPU: 1} and `rollout.num_engines` bundles of {GPU: rollout.tensor_parallel_size} (CPUs on a CPU cluster).
Before anything is created the request is checked against the nodes, so a job that cannot fit fails at once
with the shortfall named, instead of waiting forever on a pending placement group.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

PLACEMENT_TIMEOUT_S = 60.0
log = logging.getLogger("rlvr")


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
        how = address
    elif os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)  # inside `ray job submit`: the job's runtime env applies
        how = "auto"
    else:
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=True)
        how = "local"
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    warning = exposure_warning(ray.get_runtime_context().gcs_address, is_token_auth_enabled())
    if warning:
        log.warning(warning)
    return how


def exposure_warning(gcs_address: str, token_auth: bool) -> str | None:
    """What to say when this job runs on a Ray cluster that listens beyond loopback without token auth: Ray's job
    API runs whatever it is sent, so anyone who reaches its ports can run code on every node."""
    host = gcs_address.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if token_auth or loopback:
        return None
    return (f"the Ray cluster at {gcs_address} listens beyond loopback without token authentication: anyone who "
            f"can reach its ports can submit code to it. Start every node (and submit) with RAY_AUTH_MODE=token and "
            f"the same RAY_AUTH_TOKEN, bound to a private interface (README, Many nodes)")


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
                              f"a CPU preset (e.g. configs/mawps_smollm2_cpu.yaml)")
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
