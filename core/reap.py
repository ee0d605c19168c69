"""Killing an actor with everything it started: `ray.kill` ends the actor's own process only.

An engine of TP > 1 runs its TP workers as child processes (vLLM's `mp` executor). They exit with their parent
only if their main thread is free to notice, which is exactly what a hung engine's workers are not (stuck in a CUDA
kernel or an NCCL collective), and while they live they hold their GPUs' memory: the replacement engine would then
fail to start in the same bundle, and so would a job restart. So an actor reports its process tree when it starts
(`process_tree`), and `kill_trees` kills the actor, then every process of that tree still alive, from a task on
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


def start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat, field 22): with the pid, what identifies
    it. Unlike a wall-clock start time it does not move when the clock is stepped. None when the pid is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited: its memory is free


def process_tree() -> dict:
    """This process and its descendants now, as (pid, start ticks) so that a reused pid is never killed; and the
    node they run on."""
    import psutil

    me = psutil.Process()
    tree = [(p.pid, start_ticks(p.pid)) for p in (me, *me.children(recursive=True))]
    return {"pid": me.pid, "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "tree": [(pid, ticks) for pid, ticks in tree if ticks is not None]}


def _alive(tree: list) -> list[int]:
    return [pid for pid, ticks in tree if start_ticks(pid) == ticks]


def kill_and_wait(tree: list, timeout_s: float, grace_s: float = 3.0) -> list[int]:
    """Give `tree` `grace_s` to go by itself (a healthy actor that `ray.kill` reached exits with its children), then
    SIGKILL every process of it that is still the one recorded (a stopped one too: SIGKILL needs no cooperation),
    and wait until all are gone. Returns the pids still there after `timeout_s` (e.g. a process in an
    uninterruptible driver call, which exits when the call returns)."""
    deadline = time.monotonic() + grace_s
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _alive(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout_s
    while (left := _alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


_reap_remote = ray.remote(num_cpus=0, max_retries=0)(kill_and_wait)


REAP_S = 60.0  # how long the processes of a killed actor may take to be gone (then a warning; nothing waits on)


def kill_trees(actors_and_infos: list[tuple[object, dict]], timeout_s: float = REAP_S) -> None:
    """Kill each actor and the process tree it reported in its info (`process_tree`), and wait until all are gone:
    the actors are killed at once, then one task on each actor's node kills what is left. The whole call is
    bounded by `timeout_s` + 30 s; a node that is gone has taken its processes with it."""
    for actor, _ in actors_and_infos:
        ray.kill(actor, no_restart=True)
    reap([info for _, info in actors_and_infos], timeout_s)


def reap(infos: list[dict], timeout_s: float = REAP_S) -> None:
    """SIGKILL what is left of each process tree (`process_tree` infos), from a task on its node, and wait until
    they are gone; bounded by `timeout_s` + 30 s. Also for actors no handle reaches: those of a dead driver."""
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    reaps = {}
    for info in infos:
        if not info.get("tree"):
            continue  # an actor that never reported (it died or hung before its first answer): only ray.kill
        if info.get("node_id") not in alive_nodes:
            log.warning(f"pid {info.get('pid')} on {info.get('node')}: its node is gone, and its processes with it")
            continue
        strategy = NodeAffinitySchedulingStrategy(info["node_id"], soft=False)
        reaps[_reap_remote.options(scheduling_strategy=strategy).remote(info["tree"], timeout_s)] = info
    done, pending = ray.wait(list(reaps), num_returns=len(reaps), timeout=timeout_s + 30) if reaps else ([], [])
    for ref in pending:
        ray.cancel(ref, force=True)
        info = reaps[ref]
        log.warning(f"could not reap the processes of pid {info.get('pid')} on {info.get('node')} within "
                    f"{timeout_s + 30:.0f}s (its node is slow or unreachable): their GPU memory may not be free")
    for ref in done:
        info = reaps[ref]
        try:
            left = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - e.g. the node died meanwhile; never mask the fault in flight
            log.warning(f"could not reap the processes of pid {info.get('pid')} on {info.get('node')}: "
                        f"{type(err).__name__}: {err}")
            continue
        if left:
            log.warning(f"processes {left} of pid {info.get('pid')} on {info.get('node')} are still there "
                        f"{timeout_s:.0f}s after SIGKILL (in an uninterruptible call?): their GPU memory is not free")
