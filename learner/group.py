"""`LearnerGroup`: N `LearnerWorker` ranks in the learner placement group, driven as one learner."""
from __future__ import annotations

import math

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.worker import LearnerWorker, worker_env
from core.balance import split_balanced
from core.types import TrainSample, TrainShard


def make_shards(samples: list[TrainSample], world_size: int, micro_batch_size: int, minibatches: int,
                temperature: float) -> list[TrainShard]:
    """Split a rollout batch into `minibatches` consecutive minibatches, each spread over the ranks by token count.

    Every rank makes the same number of micro-batch passes per minibatch (empty ones where it has fewer samples),
    which DeepSpeed's collectives need; the global token/sequence counts make the loss independent of the split.
    """
    if not samples:
        raise ValueError("make_shards: no samples")
    size = math.ceil(len(samples) / min(minibatches, len(samples)))
    minibatches = math.ceil(len(samples) / size)  # e.g. 9 samples in 4 asks → 3 of 3, never an empty one
    per_rank: list[list[list[TrainSample]]] = [[] for _ in range(world_size)]
    tokens, seqs, micro = [], [], []
    for k in range(minibatches):
        mb = samples[k * size:(k + 1) * size]
        parts = split_balanced([s.num_tokens for s in mb], world_size)
        for r, part in enumerate(parts):
            per_rank[r].append([mb[i] for i in part])
        tokens.append(sum(len(s.completion_ids) for s in mb))
        seqs.append(len(mb))
        micro.append(max(1, max(math.ceil(len(p) / micro_batch_size) for p in parts)))
    return [TrainShard(per_rank[r], tokens, seqs, micro, temperature) for r in range(world_size)]


def reduce_metrics(per_rank: list[dict]) -> dict:
    """Sums from every rank → batch metrics (means per token unless named otherwise)."""
    tot = {k: sum(m[k] for m in per_rank) for k in ("tokens", "seqs", "loss", "clipped_tokens", "ratio_sum",
                                                    "kl_sum", "entropy_sum", "mismatch_sum", "mismatch_tokens")}
    n = max(tot["tokens"], 1.0)
    first = per_rank[0]
    steps = max(first["steps"], 1)
    return {
        "loss": tot["loss"] / steps,  # mean over minibatches of the minibatch loss
        "clip_frac": tot["clipped_tokens"] / n,
        "ratio_mean": tot["ratio_sum"] / n,
        "ratio_max": max(m["ratio_max"] for m in per_rank),
        "ratio_min": min(m["ratio_min"] for m in per_rank),
        "kl": tot["kl_sum"] / n,
        "entropy": tot["entropy_sum"] / n,
        "logprob_mismatch": tot["mismatch_sum"] / max(tot["mismatch_tokens"], 1.0),  # mean |learner − vLLM| logprob
        "grad_norm": first["grad_norm"],
        "lr": first["lr"],
        "optimizer_steps": first["steps"],
        "skipped_steps": first["skipped_steps"],
        "nonfinite_microbatches": first["nonfinite_microbatches"],
        "train_tokens": tot["tokens"],
        "train_seconds": max(m["train_seconds"] for m in per_rank),
    }


class LearnerGroup:
    def __init__(self, model: str, device: str, cfg, grpo_cfg, *, total_steps: int, dtype: str = "auto",
                 seed: int = 0, placement_group=None, worker_cls: type = LearnerWorker):
        self.cfg, self.device = cfg, device
        n = cfg.num_workers
        actor = ray.remote(worker_cls)  # another class only in benches (a baseline to compare with)
        threads = cfg.threads or cfg.cpus_per_worker
        self.workers = []
        for r in range(n):
            strategy = None if placement_group is None else PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=r)
            self.workers.append(actor.options(
                num_cpus=cfg.cpus_per_worker, num_gpus=1 if device == "cuda" else 0, scheduling_strategy=strategy,
                runtime_env={"env_vars": worker_env(device, threads)},
            ).remote(r, n))
        master = ray.get(self.workers[0].address.remote())
        self._pending = [w.setup.remote(master, model, device, cfg.model_dump(), grpo_cfg.model_dump(),
                                        total_steps, dtype, seed) for w in self.workers]
        self.infos: list[dict] = []

    def ready(self) -> "LearnerGroup":
        """Wait until every rank has joined DeepSpeed and built its model and optimizer."""
        if self._pending:
            self.infos, self._pending = ray.get(self._pending), []
        return self

    def train_step(self, samples: list[TrainSample], temperature: float) -> dict:
        shards = make_shards(samples, len(self.workers), self.cfg.micro_batch_size, self.cfg.minibatches_per_step,
                             temperature)
        return reduce_metrics(ray.get([w.train_step.remote(s) for w, s in zip(self.workers, shards)]))

    def weight_plan(self) -> list:
        return ray.get([w.weight_plan.remote() for w in self.workers])[0]

    def sender_address(self) -> tuple[str, int]:
        return ray.get(self.workers[0].address.remote())

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float) -> list:
        return [w.open_weight_group.remote(backend, host, port, world_size, timeout_s) for w in self.workers]

    def broadcast_weights(self, version: int) -> list:
        return [w.broadcast_weights.remote(version) for w in self.workers]

    def save(self, path: str) -> None:
        ray.get([w.save.remote(path) for w in self.workers])

    def load(self, path: str) -> None:
        ray.get([w.load.remote(path) for w in self.workers])

    def export_hf(self, path: str) -> str:
        return ray.get([w.export_hf.remote(path) for w in self.workers])[0]

    def full_state_dict(self) -> dict:
        return ray.get([w.full_state_dict.remote() for w in self.workers])[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
