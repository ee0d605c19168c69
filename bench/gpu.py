"""GPU benchmark, one run (scripts/gpu_kit.sh runs it on the GPU machine; figures as ratios where there is a
baseline). CI runs it with `--device cpu` at tiny sizes (tests/test_bench.py): the same functions on gloo, so a
renamed helper fails CI, not a GPU sitting.

1. generation tokens/s through `EngineGroup` (one bf16 engine with CUDA graphs in a Ray actor) ÷ raw
   `vllm.LLM.generate` in a plain process with the same settings, SmolLM2-135M-Instruct, 32 prompts × n=16 × 256;
2. weight sync of a random model with exactly Qwen2.5-0.5B's shape (494M parameters, 0.99 GB in bf16) into a live
   engine of that model: from learner rank 0 over NCCL when there are 2+ GPUs; with one GPU from this process over
   gloo (NCCL refuses two ranks on one GPU), which measures the engine's receiving and loading, not NCCL;
3. learner training tokens/s and MFU: DeepSpeed ZeRO-2 bf16, one rank, the Qwen2.5-0.5B-shaped model, 32 samples of
   128 + 256 tokens; MFU = 6 · parameters · tokens/s ÷ the GPU's dense bf16 peak.

    python bench/gpu.py [--device cuda|cpu]     (default: cuda when there is a GPU)
"""
import argparse
import json
import subprocess
import sys
import time

import common
import ray
import torch

from core import accel, weight_sync
from core.models import _atomic_build, build_qwen25_05b_shape, cache_dir, resolve_model
from core.types import TrainSample
from core.config import GRPOConfig, LearnerConfig, RolloutConfig
from learner.group import LearnerGroup
from rollout.group import EngineGroup

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM
UTIL = 0.3
# What each device runs: the figures of the docstring on cuda; on cpu the same calls at sizes 2 cores finish in a
# minute (the tiny built-in Qwen2 for every part).
SIZES = {"cuda": dict(prompts=32, n=16, max_tokens=256, batch=32, prompt_len=128, completion_len=256, micro=8,
                      bucket_mb=256, syncs=5),
         "cpu": dict(prompts=4, n=4, max_tokens=32, batch=8, prompt_len=32, completion_len=32, micro=4,
                     bucket_mb=1, syncs=3)}
KV_GB = 0.1  # CPU engines: an explicit KV cache
RAW = r"""
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
a = json.loads(sys.argv[1])
memory = (dict(gpu_memory_utilization=a["util"]) if a["device"] == "cuda" else
          dict(kv_cache_memory_bytes=int(a["kv_gb"] * (1 << 30)), enforce_eager=True))
llm = LLM(model=a["model"], dtype="bfloat16", seed=0, max_model_len=1024, distributed_executor_backend="uni",
          logprobs_mode="processed_logprobs", enable_prefix_caching=True, **memory)
sp = SamplingParams(n=a["n"], temperature=1.0, max_tokens=a["max_tokens"], logprobs=0)
prompts = [TokensPrompt(prompt_token_ids=p) for p in a["prompts"]]
llm.generate(prompts, sp, use_tqdm=False)
t = time.perf_counter()
out = llm.generate(prompts, sp, use_tqdm=False)
print("RAW", sum(len(c.token_ids) for o in out for c in o.outputs) / (time.perf_counter() - t))
"""


def qwen25_05b_shaped() -> str:
    """Random weights, Qwen2.5-0.5B's exact config (tied embeddings), the tiny built-in's tokenizer."""
    tokenizer = resolve_model("builtin:tiny-qwen2")
    return str(_atomic_build(cache_dir() / "bench-qwen2.5-0.5b-shape",
                             lambda path: build_qwen25_05b_shape(path, tokenizer)))


def engine_group(model: str, device: str) -> EngineGroup:
    return EngineGroup(model, device, RolloutConfig(num_engines=1, gpu_memory_utilization=UTIL, cpu_kv_cache_gb=KV_GB),
                       max_model_len=1024, dtype="bfloat16")


def generation_ratio(model: str, device: str, size: dict, engines: EngineGroup) -> None:
    """`engines` (one engine of `model`) against raw vLLM in a plain process with the same settings."""
    prompts = [list(range(100 + i, 164 + i)) for i in range(size["prompts"])]
    args = dict(model=model, device=device, util=UTIL, kv_gb=KV_GB, prompts=prompts, n=size["n"],
                max_tokens=size["max_tokens"])
    raw_run = subprocess.run([sys.executable, "-c", RAW, json.dumps(args)], capture_output=True, text=True)
    lines = [line for line in raw_run.stdout.splitlines() if line.startswith("RAW")]
    if raw_run.returncode or not lines:
        raise RuntimeError(f"raw vLLM run failed (exit {raw_run.returncode}):\n{raw_run.stderr[-3000:]}")
    raw = float(lines[0].split()[1])
    sampling = dict(temperature=1.0, max_tokens=size["max_tokens"])
    engines.generate(prompts, size["n"], **sampling)  # warm-up
    t = time.perf_counter()
    groups = engines.generate(prompts, size["n"], **sampling)
    ours = sum(len(s.completion_ids) for g in groups for s in g) / (time.perf_counter() - t)
    print(f"generation, bf16, {size['prompts']} prompts × n={size['n']} × ≤{size['max_tokens']} tokens: raw vLLM "
          f"{raw:.0f} tok/s, EngineGroup {ours:.0f} tok/s, ratio {ours / raw:.3f} (target >= 0.95)", flush=True)


def sync_report(how: str, plan: list, times: list[float], inner: list[dict]) -> None:
    best = min(range(1, len(times)), key=times.__getitem__)
    nbytes = sum(b.nbytes for b in plan)
    print(f"weight sync ({nbytes / 1e9:.3f} GB bf16, {len(plan)} buckets), {how}: per sync "
          f"{' '.join(f'{t:.3f}' for t in times)} s; best after the first {times[best]:.3f} s "
          f"({nbytes / times[best] / 1e9:.2f} GB/s); engine side {json.dumps(inner[best])}", flush=True)


def sync_from_learner(engines: EngineGroup, learner: LearnerGroup, device: str, size: dict) -> None:
    """Learner rank 0 → a live engine on the device's backend (NCCL: needs 2 GPUs)."""
    backend = weight_sync.BACKEND_FOR_DEVICE[device]
    plan = learner.weight_plan()
    host, port = learner.sender_address()
    ray.get(learner.open_weight_group(backend, host, port, 2, 300) +
            engines.open_weight_group(backend, host, port, 2, 300, plan))
    times, inner = [], []
    for version in range(1, size["syncs"] + 1):
        t = time.perf_counter()
        out = ray.get(learner.broadcast_weights(version) + engines.receive_weights(version))
        times.append(time.perf_counter() - t)
        inner.append(out[1])
    ray.get(learner.close_weight_group() + engines.close_weight_group())
    sync_report(f"learner rank 0 → engine over {backend}", plan, times, inner)


def sync_from_here(model: str, engines: EngineGroup, size: dict) -> None:
    """This process (CPU) → a live engine over gloo: what one GPU allows (NCCL refuses two ranks on one GPU). It
    measures the engine's receiving and loading, not NCCL."""
    from transformers import AutoModelForCausalLM

    named = {k: v.data for k, v in AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).named_parameters()}
    plan = weight_sync.plan_buckets([(k, v.dtype, tuple(v.shape)) for k, v in named.items()], size["bucket_mb"] << 20)
    host, port = "127.0.0.1", weight_sync.free_port("127.0.0.1")
    group = common.open_beside(engines.open_weight_group("gloo", host, port, 2, 300, plan), host, port, 2, 0)
    buffers = weight_sync.RotatingBuffers(plan, "cpu")
    times, inner = [], []
    for version in range(1, size["syncs"] + 1):
        t = time.perf_counter()
        refs = engines.receive_weights(100 + version)
        weight_sync.send(group, plan, 100 + version, (weight_sync.pack(b, named, "cpu", out=buffers.next(b))
                                                      for b in plan), "cpu")
        inner.append(ray.get(refs)[0])
        times.append(time.perf_counter() - t)
    weight_sync.close_group(group)
    ray.get(engines.close_weight_group())
    sync_report("this process (CPU) → engine over gloo", plan, times, inner)


def learner_group(model: str, device: str, size: dict) -> LearnerGroup:
    cfg = LearnerConfig(num_workers=1, micro_batch_size=size["micro"], lr=1e-6, bucket_mb=size["bucket_mb"])
    return LearnerGroup(model, device, cfg, GRPOConfig(), total_steps=10, dtype="bfloat16")


def learner_mfu(learner: LearnerGroup, device: str, size: dict) -> None:
    g = torch.Generator().manual_seed(0)
    p, c, b = size["prompt_len"], size["completion_len"], size["batch"]
    batch = [TrainSample(torch.randint(3, 500, (p,), generator=g).tolist(),
                         torch.randint(3, 500, (c,), generator=g).tolist(),
                         [-1.0] * c, float(torch.randn(1, generator=g))) for _ in range(b)]
    learner.train_step(batch, 1.0)
    seconds, peak = [], 0.0
    for _ in range(3):
        t = time.perf_counter()
        peak = learner.train_step(batch, 1.0).learner_peak_gib
        seconds.append(time.perf_counter() - t)
    params = learner.infos[0]["params"]
    tokens = b * (p + c) / min(seconds)
    flops = 6 * params * tokens
    name = accel.for_device(device).device_name()
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = f"MFU {flops / peak_flops:.1%} of {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "no peak known"
    print(f"learner ({params / 1e6:.1f}M params), ZeRO-2 bf16, 1 rank on {name}: {tokens:.0f} tokens/s through "
          f"forward+backward ({b * c / min(seconds):.0f} completion tokens/s), 6·N·tokens/s = {flops / 1e12:.3f} "
          f"TFLOP/s, {mfu}; peak memory {peak:.2f} GiB", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args(argv).device
    size = SIZES[device]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    ray.cloudpickle.register_pickle_by_value(common)
    import vllm

    where = f"{gpus} × " if gpus else ""
    print(f"bench/gpu.py --device {device}: {where}{accel.for_device(device).device_name()}, "
          f"torch {torch.__version__}, vllm {vllm.__version__}", flush=True)
    # One engine and one learner serve every part that can share them (each start costs ~1 min on a GPU). On one
    # GPU the learner starts after the engines are gone: each asks Ray for the whole GPU.
    shaped = qwen25_05b_shaped() if device == "cuda" else resolve_model("builtin:tiny-qwen2")
    learner = learner_group(shaped, device, size) if device == "cpu" or gpus >= 2 else None
    if device == "cuda":
        smol = resolve_model("builtin:smollm2-135m-instruct")
        generation = engine_group(smol, device).ready()
        generation_ratio(smol, device, size, generation)
        generation.shutdown()
    engines = engine_group(shaped, device).ready()
    if device == "cpu":
        generation_ratio(shaped, device, size, engines)
    if learner is not None:
        sync_from_learner(engines, learner.ready(), device, size)
    if device == "cpu" or gpus == 1:
        sync_from_here(shaped, engines, size)
    engines.shutdown()
    learner = (learner or learner_group(shaped, device, size)).ready()
    learner_mfu(learner, device, size)
    learner.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
