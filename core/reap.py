"""Killing an actor with everything it started: `ray.kill` ends the actor's own process only.

An engine of TP > 1 runs its TP workers as child processes (vLLM's `mp` executor). They exit with their parent
only if their main thread is free to notice, which is exactly what a hung engine's workers are not (stuck in a CUDA
kernel or an NCCL collective), and while they live they hold their GPUs' memory: the replacement engine would then
fail to start in the same bundle, and so would a job restart. So an actor reports its process tree when it starts
(`process_tree`), and `kill_tree` kills the actor, then every process of that tree still alive, from a task on
the actor's node, and waits (bounded) until they are gone: a GPU's memory is free once its processes have exited.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger("rlvr.reap")


def process_tree() -> dict:
    """This process and its descendants now, identified by (pid, start time) so that a reused pid is never killed;
    and the node they run on."""
    import psutil

    me = psutil.Process()
    tree = [(p.pid, p.create_time()) for p in (me, *me.children(recursive=True))]
    return {"pid": me.pid, "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "tree": tree}


def _alive(tree: list) -> list:
    import psutil

    procs = []
    for pid, created in tree:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.Error:  # gone (or not ours to see): nothing left to kill
            pass
    return procs


def kill_and_wait(tree: list, timeout_s: float, grace_s: float = 3.0) -> list[int]:
    """Give `tree` `grace_s` to go by itself (a healthy actor that `ray.kill` reached exits with its children), then
    SIGKILL every process of it that is still the one recorded (a stopped one too: SIGKILL needs no cooperation),
    and wait until all are gone. Returns the pids still there after `timeout_s` (e.g. a process in an
    uninterruptible driver call, which exits when the call returns)."""
    deadline = time.monotonic() + grace_s
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in _alive(tree):
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout_s
    while (left := _alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p.pid for p in left]


_reap_remote = ray.remote(num_cpus=0, max_retries=0)(kill_and_wait)


def kill_trees(actors_and_infos: list[tuple[object, dict]], timeout_s: float = 30.0) -> None:
    """Kill each actor and the process tree it reported in its info (`process_tree`), and wait until all are gone:
    the actors are killed at once, then one task on each actor's node kills what is left. Bounded by `timeout_s`;
    a node that is gone has taken its processes with it."""
    for actor, _ in actors_and_infos:
        ray.kill(actor, no_restart=True)
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    reaps = []
    for _, info in actors_and_infos:
        if info.get("tree") and info.get("node_id") in alive_nodes:
            strategy = NodeAffinitySchedulingStrategy(info["node_id"], soft=False)
            reaps.append((info, _reap_remote.options(scheduling_strategy=strategy).remote(info["tree"], timeout_s)))
    for info, ref in reaps:
        try:
            left = ray.get(ref, timeout=timeout_s + 30)
        except Exception as err:  # noqa: BLE001 - e.g. the node died meanwhile; never mask the fault in flight
            log.warning(f"could not reap the processes of pid {info.get('pid')} on {info.get('node')}: "
                        f"{type(err).__name__}: {err}")
            continue
        if left:
            log.warning(f"processes {left} of pid {info.get('pid')} on {info.get('node')} are still there "
                        f"{timeout_s:.0f}s after SIGKILL (in an uninterruptible call?): their GPU memory is not free")
