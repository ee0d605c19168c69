"""`LearnerGroup`: N `LearnerWorker` ranks in the learner placement group, driven as one learner."""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.types import LearnerStats, Timeouts, TrainSample
from core.waits import wait_all
from learner.shards import make_shards, reduce_metrics
from learner.worker import LearnerWorker, worker_env

__all__ = ["LearnerGroup", "make_shards", "reduce_metrics"]


class LearnerGroup:
    """Every call waits with a bound (`timeouts`): a rank that dies raises `ActorFault` at once, one that hangs
    raises it at the phase's timeout, naming the rank; the driver then restarts the job from its checkpoint."""

    def __init__(self, model: str, device: str, cfg, grpo_cfg, *, total_steps: int, dtype: str = "auto",
                 seed: int = 0, placement_group=None, timeouts=Timeouts(), worker_cls: type = LearnerWorker):
        self.cfg, self.device, self.timeouts = cfg, device, timeouts
        n = cfg.num_workers
        actor = ray.remote(worker_cls)  # another class only in benches (a baseline to compare with)
        threads = cfg.threads or cfg.cpus_per_worker
        self.workers = []
        for r in range(n):
            strategy = None if placement_group is None else PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=r)
            self.workers.append(actor.options(
                num_cpus=cfg.cpus_per_worker, num_gpus=1 if device == "cuda" else 0, scheduling_strategy=strategy,
                runtime_env={"env_vars": worker_env(device, threads)}, max_restarts=0, max_task_retries=0,
            ).remote(r, n))
        self.infos: list[dict] = [{} for _ in self.workers]
        master = self._wait([self.workers[0].address.remote()], "learner start", timeouts.start_s,
                            ["learner rank 0"])[0]
        self._pending = [w.setup.remote(master, model, device, cfg, grpo_cfg, total_steps,
                                        dtype, seed, timeouts.train_s) for w in self.workers]

    def name(self, r: int) -> str:
        info = self.infos[r]
        return f"learner rank {r}" + (f" (pid {info['pid']} on {info['node']})" if "pid" in info else "")

    def _wait(self, refs: list, phase: str, timeout_s: float, names: list[str] | None = None) -> list:
        return wait_all(refs, names or [self.name(r) for r in range(len(refs))], phase, timeout_s)

    def ready(self) -> "LearnerGroup":
        """Wait until every rank has joined DeepSpeed and built its model and optimizer."""
        if self._pending:
            self.infos = self._wait(self._pending, "learner start", self.timeouts.start_s)
            self._pending = []
        return self

    def train_step(self, samples: list[TrainSample], temperature: float, max_tokens: int = 0) -> LearnerStats:
        """One rollout batch; `max_tokens` (rollout.max_tokens) is the constant of grpo.loss_agg=token_sum_norm."""
        shards = make_shards(samples, len(self.workers), self.cfg.micro_batch_size, self.cfg.minibatches_per_step,
                             temperature, max_tokens)
        refs = [w.train_step.remote(s) for w, s in zip(self.workers, shards)]
        return reduce_metrics(self._wait(refs, "train step", self.timeouts.train_s))

    def score(self, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> dict:
        refs = [w.score.remote(prompt_ids, completion_ids, temperature) for w in self.workers]
        return self._wait(refs, "score", self.timeouts.train_s)[0]

    def weight_plan(self) -> list:
        return self._wait([w.weight_plan.remote() for w in self.workers], "weight plan", self.timeouts.train_s)[0]

    def sender_address(self) -> tuple[str, int]:
        return self._wait([self.workers[0].address.remote()], "weight group open", self.timeouts.broadcast_s,
                          names=[self.name(0)])[0]

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float) -> list:
        return [w.open_weight_group.remote(backend, host, port, world_size, timeout_s) for w in self.workers]

    def close_weight_group(self) -> list:
        return [w.close_weight_group.remote() for w in self.workers]

    def broadcast_weights(self, version: int) -> list:
        return [w.broadcast_weights.remote(version) for w in self.workers]

    def save(self, path: str) -> list[dict[str, int]]:
        """Every rank writes its part; returns each rank's view of the folder afterwards ({file: size})."""
        self._wait([w.save.remote(path) for w in self.workers], "checkpoint save", self.timeouts.checkpoint_s)
        return self._wait([w.list_files.remote(path) for w in self.workers], "checkpoint save",
                          self.timeouts.checkpoint_s)

    def load(self, path: str) -> None:
        self._wait([w.load.remote(path) for w in self.workers], "checkpoint load", self.timeouts.checkpoint_s)

    def export_hf(self, path: str) -> str:
        return self._wait([w.export_hf.remote(path) for w in self.workers], "export", self.timeouts.checkpoint_s)[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
