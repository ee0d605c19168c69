"""A chaos soak: the toy job on a simulated cluster of several Ray nodes on this machine (a head and 1-CPU worker
nodes, each a `ray start` process group on loopback, token auth), submitted with `ray job submit`, with faults
injected at random moments (seeded) until it ends:

    engine_kill   kill -9 of an engine process          engine_stop   SIGSTOP of an engine process (a hang)
    learner_kill  kill -9 of the learner rank           node_loss     a worker node's processes all killed -9,
    driver_kill   kill -9 of the driver process                       and a spare node added

At the end it prints one table: faults injected and survived by kind, the steps computed again, seconds lost per
fault (median, max: from the fault until it is counted as a restart and the run is past the step it was at, less a
median step), whether every step was logged exactly once, the final model exported, no process of the run left,
and the driver's open file descriptors
and RSS over its life (bounded: DRIVER_FD_GROWTH, DRIVER_RSS_GROWTH_MIB).

    python bench/chaos.py --steps 200 --faults 3 --seed 0      # the soak (README's table): ~15 faults
    python bench/chaos.py --steps 16 --faults 1 --kinds engine_stop,node_loss,driver_kill   # CI (test_bench.py)

Exit status 0 when every fault was survived and every check holds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# The nodes this process starts read Ray's auth settings when Ray is imported: the cluster's token is made first.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.environ.get("RLVR_CHAOS_TOKEN") or secrets.token_hex(16))

from common import ROOT  # noqa: E402,F401 - puts the repo and tests/ on sys.path

import procs  # tests/procs.py: process titles and trees  # noqa: E402

from launch.local_job import LocalHead  # noqa: E402
from launch.metrics import read_jsonl  # noqa: E402
from launch.outputs import LOCK_FILE  # noqa: E402

KINDS = ("engine_kill", "engine_stop", "learner_kill", "node_loss", "driver_kill")
DRIVER_FD_GROWTH = 16  # open descriptors a driver may gain over its life
DRIVER_RSS_GROWTH_MIB = 256  # and resident memory


class Nodes:
    """1-CPU worker nodes joined to `head`: a raylet and its helpers each, started the way `ray.cluster_utils`
    starts them (the `ray start` CLI would turn 127.0.0.1 into this machine's network address); a node is lost
    when all its processes are killed -9, its actors with them."""

    def __init__(self, head: LocalHead):
        from ray._private.parameter import RayParams

        assert head.env["RAY_AUTH_TOKEN"] == os.environ["RAY_AUTH_TOKEN"], "the head must use this process's token"
        self.head, self.params, self.nodes = head, RayParams, []

    def add(self):
        from ray._private.node import Node

        params = self.params(gcs_address=self.head.gcs_address, num_cpus=1, num_gpus=0, node_ip_address="127.0.0.1",
                             object_store_memory=150 << 20, min_worker_port=0, max_worker_port=0,
                             node_manager_port=0, include_log_monitor=False,
                             # its own temp dir, as on a machine of its own: nodes that share one share their
                             # runtime-env caches, and one node's clean-up would delete the job's working dir
                             temp_dir=str(Path(self.head.temp_dir) / f"node-{len(self.nodes)}"))
        params.dashboard_agent_listen_port = None
        node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
        self.nodes.append(node)
        return node

    @staticmethod
    def raylet_pid(node) -> int:
        return node.all_processes["raylet"][0].process.pid

    def live(self) -> list:
        return [n for n in self.nodes if n.any_processes_alive()]

    def holding(self, pid: int):
        return next((n for n in self.live() if pid in procs.descendants(self.raylet_pid(n))), None)

    def kill(self, node) -> None:
        """kill -9 of the node's processes and of everything its raylet started (agents, actor workers)."""
        tree = procs.descendants(self.raylet_pid(node)) if node.any_processes_alive() else []
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def stop_all(self) -> None:
        for n in self.nodes:
            self.kill(n)


def driver_pid(out: Path) -> int | None:
    try:
        pid = json.loads((out / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if procs.alive(pid) else None


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return pid


def driver_usage(pid: int) -> tuple[int, float] | None:
    """(open file descriptors, RSS in MiB) of a process, or None when it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return fds, rss / 1024


class Watch:
    """Polls metrics.jsonl: the highest step logged so far, when each step was first logged, and the driver's usage
    at each new step."""

    def __init__(self, out: Path):
        self.out, self.first_seen, self.usage = out, {}, {}  # step → time; driver pid → [(step, fds, rss)]
        self.max_step, self.restarts, self.recomputed = 0, 0, 0  # restarts: of every kind, so far
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.is_set():
            try:
                rows = [r for r in read_jsonl(self.out / "metrics.jsonl") if "reward" in r]
            except ValueError:  # a line being written
                rows = []
            steps, now = [r["step"] for r in rows], time.monotonic()
            if rows:
                self.restarts = max(self.restarts, sum(rows[-1].get(k, 0) for k in (
                    "engine_restarts", "job_restarts", "driver_restarts")))
                self.recomputed = max(self.recomputed, rows[-1].get("steps_recomputed", 0))
            for s in steps:
                if s > self.max_step:
                    self.first_seen[s], self.max_step = now, s
                    pid = driver_pid(self.out)
                    if pid and (u := driver_usage(pid)):
                        self.usage.setdefault(pid, []).append((s, *u))
            time.sleep(0.05)

    def gaps(self) -> list[float]:
        times = [self.first_seen[s] for s in sorted(self.first_seen)]
        return [b - a for a, b in zip(times, times[1:])]


def inject(kind: str, out: Path, nodes: Nodes) -> str | None:
    """One fault of `kind` now; what it hit, or None when there was nothing to hit at this moment."""
    if kind in ("engine_kill", "engine_stop", "learner_kill"):
        cls = "LearnerWorker" if kind == "learner_kill" else "RolloutEngine"
        pids = sorted(procs.actor_pids(cls))
        if not pids:
            return None
        pid = random.choice(pids)
        os.kill(pid, signal.SIGSTOP if kind == "engine_stop" else signal.SIGKILL)
        return f"{cls} pid {pid}"
    if kind == "driver_kill":
        pid = driver_pid(out)
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        return f"driver pid {pid}"
    held = [n for pid in [*procs.actor_pids("RolloutEngine"), *procs.actor_pids("LearnerWorker")]
            if (n := nodes.holding(pid)) is not None]
    if not held:
        return None
    node = random.choice(sorted(held, key=nodes.raylet_pid))
    pid = nodes.raylet_pid(node)
    nodes.kill(node)
    nodes.add()  # the spare
    return f"node (raylet pid {pid})"


def soak(steps: int, faults_per_kind: int, seed: int, timeout_s: float, kinds: list[str]) -> dict:
    random.seed(seed)
    plan = [k for k in kinds for _ in range(faults_per_kind)]
    random.shuffle(plan)
    out = Path(tempfile.mkdtemp(prefix="rlvr-chaos-")) / "run"
    args = ["python", "launch/gsm8k.py", "--config", "toy_tiny_cpu.yaml", "train.device=cpu", f"train.steps={steps}",
            f"train.output_dir={out}", "rollout.num_engines=2", "eval.every=0", "log.sample_every=0",
            "log.tensorboard=false", "train.max_restarts=100", "rollout.max_restarts=100"]
    head = LocalHead(num_cpus=0)  # the head holds no actor: every actor is on a node that can be lost
    head.env["RAY_AUTH_TOKEN"] = os.environ["RAY_AUTH_TOKEN"]
    head.start()
    nodes = Nodes(head)
    result = {"injected": [], "job": None}
    try:
        for _ in range(4):  # learner, two engines, one spare CPU
            nodes.add()
        procs.wait_for(lambda: head.ray("status", f"--address={head.gcs_address}").count(" node_") >= 5, 120, 1.0,
                       "5 nodes up")
        watch = Watch(out)
        job = threading.Thread(target=lambda: result.update(job=head.submit(args, timeout_s=timeout_s)),
                               daemon=True)
        job.start()
        # The faults are spread over the run; each comes at a random moment once the job has recovered from the last.
        every = max(3, (steps - 6) // (len(plan) + 1))
        for i, kind in enumerate(plan):
            at = 3 + (i + 1) * every
            procs.wait_for(lambda: watch.max_step >= at or not job.is_alive(), timeout_s, 0.05, f"step {at}")
            if not job.is_alive():
                break
            time.sleep(random.uniform(0.0, 1.0))
            before, restarts, recomputed, start = watch.max_step, watch.restarts, watch.recomputed, time.monotonic()
            hit = inject(kind, out, nodes)
            print(f"[chaos] step {before}: {kind} -> {hit}", flush=True)
            # Recovered: the fault is counted (a restart of some kind) and the run is past where it was.
            procs.wait_for(lambda: (watch.restarts > restarts and watch.max_step > before) or not job.is_alive()
                           or not hit, timeout_s, 0.05, "a new step after the recovery")
            took = time.monotonic() - start
            redo = watch.recomputed - recomputed
            result["injected"].append({"kind": kind, "hit": hit, "at_step": before, "seconds": took, "redo": redo})
            print(f"[chaos]   counted and past step {before} {took:.1f}s later; {redo} step(s) computed again",
                  flush=True)
        job.join(timeout_s)
        watch.stop.set()
        try:
            gone = procs.wait_for(lambda: not (procs.actor_pids("RolloutEngine") or procs.actor_pids("LearnerWorker")),
                                  60, 0.5, "the run's actors gone")
        except TimeoutError:
            gone = False
        result.update(watch=watch, out=out, actors_gone=bool(gone))
    finally:
        driver = driver_pid(out)  # a job cut short (a stop, a timeout): its watcher and driver outlive the head
        for pid in ([parent(driver), driver] if driver else []):  # the watcher first: it would start another
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        nodes.stop_all()
        head.stop()
    result["nothing_left"] = result.get("actors_gone", False) and not any(n.any_processes_alive() for n in nodes.nodes)
    return result


def report(result: dict, steps: int, seed: int, kinds: list[str]) -> tuple[str, bool]:
    watch, out = result["watch"], result["out"]
    code, log = result["job"] or (None, "")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    once = [r["step"] for r in rows] == list(range(1, steps + 1))
    typical = statistics.median(watch.gaps()) if watch.gaps() else 0.0
    lost: dict[str, list[float]] = {}
    for f in result["injected"]:
        if f["hit"]:
            lost.setdefault(f["kind"], []).append(max(0.0, f["seconds"] - typical))
    exported = (out / "final_model" / "config.json").exists()
    survived = code == 0 and once
    last = rows[-1] if rows else {}
    lines = [f"chaos soak: seed {seed}, {steps} steps of the toy job, 4 one-CPU worker nodes + a CPU-less head; job "
             f"exit code {code}; median step {typical:.2f}s",
             "", "| fault | injected | survived | seconds lost: median | max | steps computed again: max |",
             "|---|---|---|---|---|---|"]
    for kind in kinds:
        hits = [f for f in result["injected"] if f["kind"] == kind and f["hit"]]
        secs = lost.get(kind, [])
        lines.append(f"| {kind} | {len(hits)} | {len(hits) if survived else 0} | "
                     f"{statistics.median(secs) if secs else 0:.1f} | {max(secs) if secs else 0:.1f} | "
                     f"{max((f['redo'] for f in hits), default=0)} |")
    ok_usage = True
    usage_lines = []
    for pid, samples in watch.usage.items():
        (s0, f0, r0), (s1, f1, r1) = samples[0], samples[-1]
        ok = f1 - f0 <= DRIVER_FD_GROWTH and r1 - r0 <= DRIVER_RSS_GROWTH_MIB
        ok_usage &= ok
        usage_lines.append(f"  driver pid {pid}: steps {s0}-{s1}: fds {f0} -> {f1}, RSS {r0:.0f} -> {r1:.0f} MiB"
                           f"{'' if ok else '  (GREW PAST THE BOUND)'}")
    checks = {"every step logged exactly once": once, "final model exported": exported,
              "no process of the run left": result["nothing_left"],
              f"driver growth within +{DRIVER_FD_GROWTH} fds, +{DRIVER_RSS_GROWTH_MIB} MiB": ok_usage}
    lines += ["", f"steps computed again: {last.get('steps_recomputed')}; engine restarts {last.get('engine_restarts')}"
              f", job restarts {last.get('job_restarts')}, driver restarts {last.get('driver_restarts')}",
              *(f"{'ok  ' if v else 'FAIL'} {k}" for k, v in checks.items()), *usage_lines]
    if not survived:
        lines += ["", "job log tail:", log[-3000:]]
    return "\n".join(lines), survived and all(checks.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--faults", type=int, default=3, help="faults of each kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole job")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"faults to inject, of {', '.join(KINDS)}")
    a = p.parse_args()
    kinds = a.kinds.split(",")
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: each of {', '.join(KINDS)}")
    # A stop (SIGTERM, a timeout) still tears the nodes and the head down: `soak`'s finally runs on SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = soak(a.steps, a.faults, a.seed, a.timeout, kinds)
    text, ok = report(result, a.steps, a.seed, kinds)
    print(text, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
