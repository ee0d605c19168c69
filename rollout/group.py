"""`EngineGroup`: M `RolloutEngine` actors in the rollout placement group, used as one sampler."""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.balance import split_balanced
from core.types import Sample
from rollout.engine import RolloutEngine, engine_env


class EngineGroup:
    def __init__(self, model: str, device: str, cfg, *, max_model_len: int, dtype: str = "auto", seed: int = 0,
                 placement_group=None):
        self.cfg, self.device = cfg, device
        threads = cfg.threads or cfg.cpus_per_engine
        actor = ray.remote(RolloutEngine)
        self.engines = []
        for i in range(cfg.num_engines):
            strategy = None if placement_group is None else PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=i)
            self.engines.append(actor.options(
                num_cpus=cfg.cpus_per_engine, num_gpus=cfg.tensor_parallel_size if device == "cuda" else 0,
                scheduling_strategy=strategy, runtime_env={"env_vars": engine_env(device, threads)},
            ).remote(model, device, dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                     max_model_len=max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                     cpu_kv_cache_gb=cfg.cpu_kv_cache_gb, enforce_eager=cfg.enforce_eager,
                     overlong_prompt=cfg.overlong_prompt, seed=seed, engine_index=i))
        self._pending = [e.info.remote() for e in self.engines]
        self.infos: list[dict] = []

    def ready(self) -> "EngineGroup":
        """Wait until every engine has started (engines and learners start side by side)."""
        if self._pending:
            self.infos, self._pending = ray.get(self._pending), []
        return self

    @property
    def num_workers(self) -> int:
        """Receiving ranks in the weight group: engines × TP."""
        return len(self.engines) * self.cfg.tensor_parallel_size

    def generate(self, prompts: list[list[int]], n: int, *, temperature: float, top_p: float = 1.0,
                 max_tokens: int, stop: list[str] | None = None, seed: int | None = None) -> list[list[Sample]]:
        """n samples per prompt, prompts spread over the engines by token cost; results in prompt order."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        parts = split_balanced([len(p) + max_tokens for p in prompts], len(self.engines))
        refs = [(part, eng.generate.remote([prompts[i] for i in part], n, temperature, top_p, max_tokens, stop,
                                           None if seed is None else seed + k))
                for k, (eng, part) in enumerate(zip(self.engines, parts)) if part]
        out: list[list[Sample]] = [[] for _ in prompts]
        for part, samples in zip([p for p, _ in refs], ray.get([r for _, r in refs])):
            for i, s in zip(part, samples):
                out[i] = s
        return out

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float,
                          plan: list) -> list:
        """Object refs of every engine joining the group; the caller waits on them with the sender's."""
        tp = self.cfg.tensor_parallel_size
        return [e.open_weight_group.remote(backend, host, port, world_size, 1 + i * tp, timeout_s, plan)
                for i, e in enumerate(self.engines)]

    def receive_weights(self, version: int) -> list:
        return [e.receive_weights.remote(version) for e in self.engines]

    def shutdown(self) -> None:
        for e in self.engines:
            ray.kill(e)
        self.engines = []
