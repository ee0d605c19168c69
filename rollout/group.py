"""`EngineGroup`: M `RolloutEngine` actors in the rollout placement group, used as one sampler that outlives its
engines.

An engine that dies (its process killed, OOM, its node lost) or hangs is killed and re-created in its own
placement-group bundle, and the prompts it held are generated again, on every engine: the caller gets all its groups in prompt order as if nothing had happened. Once the engines are in a
weight group, a replacement is not a member and serves its startup weights, so `generate` raises `EnginesReplaced`
instead, holding what was generated so far: the weight channel (`launch.weights`) opens a group over the new
membership, sends the learner's current weights, and generates the rest with it as `resume`.
An engine hangs when it holds a call and its work count (`rollout.progress`: engine steps, weight buckets received)
has not moved for `timeouts.stall_s`, or its probe goes unanswered that long (a stopped process answers nothing):
`StallWatch`. The phase's own timeout (`timeouts.generate_s`, `broadcast_s`) stays the outer bound.
Replacements are counted against `rollout.max_restarts` per run; past it, the group raises with every engine and
cause named.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.balance import split_balanced
from core.reap import kill_trees
from core.types import Sample, Timeouts
from core.waits import DEAD, POLL_S, settle, wait_all
from rollout.engine import CONCURRENCY_GROUPS, RolloutEngine, engine_env

log = logging.getLogger("rlvr.rollout")


class EngineRestartsExhausted(RuntimeError):
    """An engine failed after the run's restart budget was spent."""


class EnginesReplaced(Exception):
    """`engines` were replaced during a generate and serve their startup weights: give them the current weights,
    then call generate again with this as `resume` for the prompts still to do."""

    def __init__(self, engines: list[int], out: list, todo: list[int]):
        super().__init__(f"engines {engines} replaced during generate; {len(todo)} prompt(s) to generate again")
        self.engines, self.out, self.todo = engines, out, todo


class StallWatch:
    """`core.waits.settle`'s `stalled` for calls on engines: `engine_of` maps a call's index to its engine. Each
    time it is asked it sends every engine still holding a call one probe (`RolloutEngine.progress`) unless one is
    on its way. An engine is hung when its probe has gone unanswered for `stall_s` (a stopped process), or when its
    work count has not moved for `stall_s` (a wedged engine). The second is not asked of a collective (`collective`:
    the weight group's open, close and sync), where a healthy member waits without work for a hung one: there a
    wedged member that still answers is found at the group's timeout. An engine found hung is killed there and
    then (`ray.kill`; `EngineGroup.restart` reaps its process tree), so that a peer blocked on it in a collective
    fails at once."""

    FIRST_STEP_FACTOR = 4

    def __init__(self, group: "EngineGroup", engine_of: dict[int, int], collective: bool = False):
        self.group, self.engine_of, self.collective = group, engine_of, collective
        self.stall_s = group.timeouts.stall_s
        self.every_s = min(POLL_S, self.stall_s / 4)  # an answer is seen within every_s of its coming back
        now = time.monotonic()
        self.count: dict[int, int | None] = {k: None for k in engine_of.values()}
        self.moved = {k: now for k in engine_of.values()}  # when its count last moved
        self.answered = dict(self.moved)  # when its last probe came back
        self.moves = {k: 0 for k in engine_of.values()}  # the first answer counts as one
        self.probes: dict[int, object] = {}
        self.found: set[int] = set()

    def __call__(self, pending: list[int]) -> dict[int, str]:
        now, hung = time.monotonic(), {}
        for k in sorted({self.engine_of[i] for i in pending if i in self.engine_of} - self.found):
            probe = self.probes.get(k)
            if probe is not None and ray.wait([probe], timeout=0)[0]:
                del self.probes[k]
                try:
                    count = ray.get(probe)
                except DEAD:  # the call itself reports the death
                    continue
                self.answered[k] = now
                if count != self.count[k]:
                    self.count[k], self.moved[k], self.moves[k] = count, now, self.moves[k] + 1
            if k not in self.probes:
                self.probes[k] = self.group.engines[k].progress.remote()
            # A call's first engine step may be long (a fresh engine's first step, a big prefill): until the count
            # has moved twice in this call, "no work" waits FIRST_STEP_FACTOR × stall_s.
            silent, idle = now - self.answered[k], now - self.moved[k]
            idle_limit = self.stall_s * (1 if self.moves[k] >= 2 else self.FIRST_STEP_FACTOR)
            if silent > self.stall_s or (idle > idle_limit and not self.collective):
                how = f"no answer for {silent:.0f}s" if silent > self.stall_s else f"no work for {idle:.0f}s"
                log.warning(f"{self.group.name(k)} made no progress ({how}): killing it as hung")
                ray.kill(self.group.engines[k], no_restart=True)  # its process tree is reaped by `restart`
                self.found.add(k)
                hung.update({i: f"made no progress ({how}; timeouts.stall_s={self.stall_s:g}): hung or stopped"
                             for i in pending if self.engine_of.get(i) == k})
        return hung


def is_engine_fault(outcome) -> bool:
    """A call that ended because its engine is gone or wedged (not because of what it was asked)."""
    if outcome.status in ("died", "hung"):
        return True
    return outcome.status == "error" and any(c.__name__ == "EngineDeadError" for c in type(outcome.error).__mro__)


class EngineGroup:
    def __init__(self, model: str, device: str, cfg, *, max_model_len: int, dtype: str = "auto", seed: int = 0,
                 placement_group=None, timeouts=Timeouts(), max_restarts: int | None = None):
        self.cfg, self.device, self.placement_group, self.timeouts = cfg, device, placement_group, timeouts
        self.max_restarts = cfg.max_restarts if max_restarts is None else max_restarts  # what is left of the budget
        self._kwargs = dict(dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size, max_model_len=max_model_len,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, cpu_kv_cache_gb=cfg.cpu_kv_cache_gb,
                            enforce_eager=cfg.enforce_eager, block_size=cfg.block_size,
                            overlong_prompt=cfg.overlong_prompt, seed=seed)
        self._model = model
        self.engines = [self._spawn(i) for i in range(cfg.num_engines)]
        self.infos: list[dict] = [{} for _ in self.engines]
        self._pending = [e.info.remote() for e in self.engines]
        self.restarts: list[dict] = []  # {"engine", "phase", "cause", "seconds"} per replacement, in order
        self.in_weight_group = False  # a replacement is not: generate hands it to the weight channel first
        self.closed = False  # after shutdown no engine is replaced (a generate in another thread ends in an error)

    def _spawn(self, i: int):
        strategy = None if self.placement_group is None else PlacementGroupSchedulingStrategy(
            self.placement_group, placement_group_bundle_index=i)
        threads = self.cfg.threads or self.cfg.cpus_per_engine
        return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutEngine).options(
            num_cpus=self.cfg.cpus_per_engine, num_gpus=self.cfg.tensor_parallel_size if self.device == "cuda" else 0,
            scheduling_strategy=strategy, runtime_env={"env_vars": engine_env(self.device, threads)},
            max_restarts=0, max_task_retries=0,  # replacements are ours: a Ray restart would serve startup weights
        ).remote(self._model, self.device, engine_index=i, **self._kwargs)

    def name(self, i: int) -> str:
        info = self.infos[i] if i < len(self.infos) else {}
        return f"engine {i}" + (f" (pid {info['pid']} on {info['node']})" if "pid" in info else "")

    def ready(self) -> "EngineGroup":
        """Wait until every engine has started (engines and learners start side by side)."""
        if self._pending:
            self.infos = wait_all(self._pending, [f"engine {i}" for i in range(len(self.engines))], "engine start",
                                  self.timeouts.start_s)
            self._pending = []
        return self

    @property
    def num_workers(self) -> int:
        """Receiving ranks in the weight group: engines × TP."""
        return len(self.engines) * self.cfg.tensor_parallel_size

    def generate(self, prompts: list[list[int]], n: int, *, temperature: float, top_p: float = 1.0,
                 max_tokens: int, stop: list[str] | None = None, seed: int | None = None, env=None,
                 rows: list[dict] | None = None, timeout_s: float | None = None,
                 resume: EnginesReplaced | None = None) -> list[list[Sample]]:
        """n samples per prompt, prompts spread over the engines by token cost; results in prompt order. An engine
        that fails is replaced and its prompts generated again; once the engines are in a weight group it raises
        `EnginesReplaced` first, and its prompts are generated when that comes back as `resume`. With `env`
        (multi-turn), `rows` are the prompts' dataset rows, and each sample is a whole trajectory."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        timeout_s = timeout_s or self.timeouts.generate_s
        out: list[list[Sample]] = resume.out if resume else [[] for _ in prompts]
        todo = list(resume.todo) if resume else list(range(len(prompts)))
        while todo:
            parts = split_balanced([len(prompts[i]) + max_tokens for i in todo], len(self.engines))
            calls = [(k, [todo[j] for j in part]) for k, part in enumerate(parts) if part]
            refs = [self.engines[k].generate.remote([prompts[i] for i in idx], n, temperature, top_p, max_tokens, stop,
                                                    None if seed is None else seed + k, env,
                                                    None if rows is None else [rows[i] for i in idx])
                    for k, idx in calls]
            failed, todo = {}, []
            watch = StallWatch(self, {j: k for j, (k, _) in enumerate(calls)})
            for (k, idx), outcome in zip(calls, settle(refs, timeout_s, watch)):
                if outcome.status == "ok":
                    for i, samples in zip(idx, outcome.value):
                        out[i] = samples
                elif is_engine_fault(outcome):
                    failed[k] = outcome.describe(timeout_s)
                    todo += idx
                else:
                    raise outcome.error  # what it was asked is wrong (e.g. an empty prompt): no restart helps
            if failed:
                self.restart(failed, "generate")
                if self.in_weight_group:
                    raise EnginesReplaced(sorted(failed), out, todo)
        return out

    def restart(self, failed: dict[int, str], phase: str) -> None:
        """Kill the failed engines, start new ones in the same bundles, and wait until they serve (their startup
        weights: the weight channel sends them the current ones)."""
        start = time.monotonic()
        if self.closed:
            raise RuntimeError(f"engines {sorted(failed)} failed during {phase} after the engine group was shut down")
        records = [{"engine": i, "phase": phase, "cause": f"{self.name(i)} {cause}", "start": start}
                   for i, cause in failed.items()]
        if len(self.restarts) + len(records) > self.max_restarts:
            earlier = "".join(f"\n  {r['phase']}: {r['cause']}" for r in self.restarts) or " none"
            raise EngineRestartsExhausted(
                f"{'; '.join(r['cause'] for r in records)} during {phase}, and the run's engine restart budget is "
                f"spent (rollout.max_restarts={self.cfg.max_restarts}); earlier restarts:{earlier}")
        for record in records:
            log.warning(f"{record['cause']} during {phase}: replacing it in its placement-group bundle")
        self.restarts += records
        # The failed engines and their TP workers are gone (their GPU memory free) before anything new starts.
        kill_trees([(self.engines[i], self.infos[i]) for i in failed])
        for i in failed:
            self.engines[i] = self._spawn(i)
            self.infos[i] = {}  # until the replacement reports its own process tree
        infos = wait_all([self.engines[i].info.remote() for i in failed], [f"replacement engine {i}" for i in failed],
                         "engine restart", self.timeouts.start_s)
        for i, info in zip(failed, infos):
            self.infos[i] = info
        log.warning(f"started {', '.join(self.name(i) for i in failed)} in {time.monotonic() - start:.1f}s "
                    f"({len(self.restarts)} restart(s) of {self.max_restarts} this run)")

    def recovered(self) -> None:
        """Every engine serves the current weights again: the pending restarts' recovery time ends now."""
        for record in self.restarts:
            record.setdefault("seconds", time.monotonic() - record["start"])

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float,
                          plan: list) -> list:
        """Object refs of every engine joining the group; the caller waits on them with the sender's."""
        tp, self.in_weight_group = self.cfg.tensor_parallel_size, True
        return [e.open_weight_group.remote(backend, host, port, world_size, 1 + i * tp, timeout_s, plan)
                for i, e in enumerate(self.engines)]

    def close_weight_group(self) -> list:
        return [e.close_weight_group.remote() for e in self.engines]

    def receive_weights(self, version: int) -> list:
        return [e.receive_weights.remote(version) for e in self.engines]

    def shutdown(self) -> None:
        self.closed = True
        kill_trees(list(zip(self.engines, self.infos)), 30.0)  # bounded: shutdown runs after failures too
        self.engines = []
