"""`RolloutEngine`: one vLLM engine inside one Ray actor.

On GPU it owns `tensor_parallel_size` GPUs of its placement-group bundle (TP workers as local processes); on CPU
it runs vLLM's in-process `uni` executor with an explicit KV-cache size. It samples n completions per prompt
with the logprob of every sampled token under the sampling distribution (temperature applied), and applies weight
broadcasts through the worker extension. Ray runs one method of an actor at a time, so an engine never generates
while an update is half-applied; only `progress`, in a concurrency group of its own, answers while a call runs.
"""
from __future__ import annotations

import os
import time

import ray

from core import patches
from core.reap import process_tree
from core.types import Sample
from rollout.progress import tick, ticks

WORKER_EXTENSION = "rollout.worker_extension.WeightReceiver"
CONCURRENCY_GROUPS = {"probe": 1}  # `progress` runs beside the call in the default group (which runs one at a time)


def engine_env(device: str, threads: int) -> dict[str, str]:
    """Environment for an engine process, set before vLLM is imported (Ray `runtime_env`)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if device == "cpu":
        # Ray leaves CUDA_VISIBLE_DEVICES alone for actors without GPUs: blank it, or a CUDA build of vLLM on a GPU
        # machine would put this CPU engine on GPU 0.
        env.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    return env


class RolloutEngine:
    def __init__(self, model: str, device: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 max_model_len: int = 1024, gpu_memory_utilization: float = 0.85, cpu_kv_cache_gb: float = 1.0,
                 enforce_eager: bool = False, block_size: int | None = None,
                 overlong_prompt: str = "drop", seed: int = 0, engine_index: int = 0):
        from vllm import LLM

        from core.models import resolve_dtype, resolve_model

        if device == "cpu" and tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size must be 1 on CPU")
        model, dtype = resolve_model(model), resolve_dtype(dtype, device)  # built-ins are made on this node if absent
        kwargs = dict(
            model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
            seed=seed + engine_index, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
            worker_extension_cls=WORKER_EXTENSION,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
        )
        if block_size is not None:
            kwargs["block_size"] = block_size
        if device == "cpu":
            # No chunked prefill on CPU: a prompt split across steps makes vLLM rewind its request's seeded generator
            # (`set_offset`), which a CPU generator does not have, so seeded sampling (sampled eval) would crash as
            # soon as a batch's prompts exceed one step's token budget.
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(cpu_kv_cache_gb * (1 << 30)),
                          enable_chunked_prefill=False)
        else:
            kwargs.update(enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization)
        start = time.perf_counter()
        patches.skip_logprob_token_text()
        self.llm = LLM(**kwargs)
        patches.count_engine_steps(self.llm, tick)
        self.start_seconds = time.perf_counter() - start
        self.ready_at = time.time()
        self.max_model_len = max_model_len
        self.overlong_prompt = overlong_prompt
        self.version = 0
        self.index = engine_index
        self.env_pool = None  # multi-turn: the environment's process pool, started by the first such generate

    def info(self) -> dict:
        """Who this engine is, and its process tree (TP workers included) for `core.reap.kill_trees`."""
        return {"index": self.index, "version": self.version, "max_model_len": self.max_model_len,
                "start_seconds": self.start_seconds, "ready_at": self.ready_at, **process_tree()}

    @ray.method(concurrency_group="probe")
    def progress(self) -> int:
        """The engine's work so far (`rollout.progress`): answered while a generate or a weight sync runs; it stops
        moving when the engine hangs, and no answer comes from a stopped process."""
        return ticks()

    def _fit(self, ids: list[int], max_tokens: int) -> list[int] | None:
        """The prompt as it will be sent, or None when it is dropped (see rollout.overlong_prompt)."""
        room = self.max_model_len - max_tokens
        if len(ids) <= room:
            return ids
        if self.overlong_prompt == "truncate_left" and room > 0:
            return ids[-room:]
        return None

    def generate(self, prompts: list[list[int]], n: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 256, stop: list[str] | None = None, seed: int | None = None, env=None,
                 rows: list[dict] | None = None) -> list[list[Sample]]:
        """n samples for each prompt (token ids), each with its tokens' logprobs. Greedy when temperature == 0 (then n
        must be 1; the logprobs are then those of the plain softmax, T = 1). With `env` (a `core.config.EnvConfig`
        naming an environment) each sample is a multi-turn trajectory (`rollout.multiturn`) of the prompt's row in
        `rows`; max_tokens is then per turn."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature == 0 and n != 1:
            raise ValueError("greedy decoding (temperature 0) gives identical samples: use n=1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt (no tokens) in the batch")
        if not prompts:
            return []
        fitted = [self._fit(list(p), max_tokens) for p in prompts]
        live = [i for i, p in enumerate(fitted) if p is not None]
        # A stop string stays in the completion: the learner trains on exactly what the model wrote, and format
        # rewards can see the closing tag.
        multiturn = env is not None and env.name is not None
        stop = list(stop or []) + (list(env.stop) if multiturn else [])
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop or None,
                                include_stop_str_in_output=True, logprobs=0, seed=seed)
        if multiturn:
            if rows is None or len(rows) != len(prompts):
                raise ValueError("a multi-turn generate needs one dataset row per prompt (rows)")
            got = self._trajectories([fitted[i] for i in live], [rows[i] for i in live], params, n, env, seed)
        else:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=fitted[i]) for i in live], params,
                                        use_tqdm=False) if live else []
            got = [[self._sample(fitted[i], comp) for comp in out.outputs] for i, out in zip(live, outputs)]
        result: list[list[Sample]] = [
            [Sample(list(p), [], [], "dropped", self.version) for _ in range(n)] for p in prompts]
        for i, samples in zip(live, got):
            result[i] = samples
        return result

    def _sample(self, prompt: list[int], comp) -> Sample:
        ids = list(comp.token_ids)
        lps = [d[t].logprob for d, t in zip(comp.logprobs, ids)] if comp.logprobs else []
        return Sample(prompt, ids, lps, comp.finish_reason or "length", self.version, comp.text)

    def _trajectories(self, prompts: list[list[int]], rows: list[dict], params, n: int, env,
                      seed: int | None) -> list[list[Sample]]:
        """n multi-turn trajectories per (fitted) prompt, on this engine's environment pool (started, or restarted
        for another environment, here)."""
        from rollout import multiturn
        from rollout.env import EnvPool

        if self.env_pool is None or self.env_pool.cfg != env:
            if self.env_pool is not None:
                self.env_pool.close()
            self.env_pool = EnvPool(env)
        tokenizer = self.llm.get_tokenizer()
        return multiturn.generate(self.llm.llm_engine, self.env_pool, prompts, rows, params, n, env,
                                  self.max_model_len, lambda text: tokenizer.encode(text, add_special_tokens=False),
                                  tokenizer.decode, tick, self.version, seed)

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int, rank_offset: int,
                          timeout_s: float, plan: list) -> list[int]:
        return self.llm.collective_rpc("rlvr_open_weight_group",
                                       args=(backend, host, port, world_size, rank_offset, timeout_s, plan))

    def close_weight_group(self) -> None:
        self.llm.collective_rpc("rlvr_close_weight_group")

    def receive_weights(self, version: int) -> dict[str, float]:
        """Join the broadcast of `version`, load it in place, drop the prefix cache. Returns the slowest TP
        worker's timings (see `WeightReceiver.rlvr_receive_weights`)."""
        timings = max(self.llm.collective_rpc("rlvr_receive_weights", args=(version,)), key=lambda t: t["seconds"])
        self.llm.reset_prefix_cache()
        self.version = version
        return timings
