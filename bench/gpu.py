"""GPU benchmark, one run (scripts/gpu_kit.sh runs it on the GPU machine; figures as ratios where there is a
baseline):

1. generation tokens/s through `EngineGroup` (one bf16 engine with CUDA graphs in a Ray actor) ÷ raw
   `vllm.LLM.generate` in a plain process with the same settings, SmolLM2-135M-Instruct, 32 prompts × n=16 × 256;
2. weight sync of a random model with exactly Qwen2.5-0.5B's shape (494M parameters, 0.99 GB in bf16) into a live
   engine of that model: from learner rank 0 over NCCL when there are 2+ GPUs; with one GPU from this process over
   gloo (NCCL refuses two ranks on one GPU), which measures the engine's receiving and loading, not NCCL;
3. learner training tokens/s and MFU: DeepSpeed ZeRO-2 bf16, one rank, the Qwen2.5-0.5B-shaped model, 32 samples of
   128 + 256 tokens; MFU = 6 · parameters · tokens/s ÷ the GPU's dense bf16 peak.

    python bench/gpu.py
"""
import json
import subprocess
import sys
import time

import common
import ray
import torch

from core import weight_sync
from core.models import _atomic_build, cache_dir, resolve_model
from core.types import TrainSample
from launch.config import GRPOConfig, LearnerConfig, RolloutConfig
from learner.group import LearnerGroup
from rollout.group import EngineGroup

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM
UTIL = 0.3
RAW = r"""
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
a = json.loads(sys.argv[1])
llm = LLM(model=a["model"], dtype="bfloat16", gpu_memory_utilization=a["util"], seed=0, max_model_len=1024,
          distributed_executor_backend="uni", logprobs_mode="processed_logprobs", enable_prefix_caching=True)
sp = SamplingParams(n=16, temperature=1.0, max_tokens=256, logprobs=0)
prompts = [TokensPrompt(prompt_token_ids=p) for p in a["prompts"]]
llm.generate(prompts, sp, use_tqdm=False)
t = time.perf_counter()
out = llm.generate(prompts, sp, use_tqdm=False)
print("RAW", sum(len(c.token_ids) for o in out for c in o.outputs) / (time.perf_counter() - t))
"""


def qwen25_05b_shaped() -> str:
    """Random weights, Qwen2.5-0.5B's exact config (tied embeddings), the tiny built-in's tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    def build(path):
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16")
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-qwen2")).save_pretrained(path)

    return str(_atomic_build(cache_dir() / "bench-qwen2.5-0.5b-shape", build))


def generation_ratio(model: str) -> None:
    prompts = [list(range(100 + i, 164 + i)) for i in range(32)]
    raw_run = subprocess.run([sys.executable, "-c", RAW, json.dumps(dict(model=model, util=UTIL, prompts=prompts))],
                             capture_output=True, text=True)
    raw = float(next(line.split()[1] for line in raw_run.stdout.splitlines() if line.startswith("RAW")))
    engines = EngineGroup(model, "cuda", RolloutConfig(num_engines=1, gpu_memory_utilization=UTIL),
                          max_model_len=1024, dtype="bfloat16").ready()
    sampling = dict(temperature=1.0, max_tokens=256)
    engines.generate(prompts, 16, **sampling)  # warm-up
    t = time.perf_counter()
    groups = engines.generate(prompts, 16, **sampling)
    ours = sum(len(s.completion_ids) for g in groups for s in g) / (time.perf_counter() - t)
    engines.shutdown()
    print(f"generation, SmolLM2-135M bf16, 32 prompts × n=16 × ≤256 tokens: raw vLLM {raw:.0f} tok/s, EngineGroup "
          f"{ours:.0f} tok/s, ratio {ours / raw:.3f} (target >= 0.95)")


def sync_seconds(model: str, gpus: int) -> None:
    engines = EngineGroup(model, "cuda", RolloutConfig(num_engines=1, gpu_memory_utilization=UTIL),
                          max_model_len=1024, dtype="bfloat16")
    times, inner = [], []
    if gpus >= 2:
        learner = LearnerGroup(model, "cuda", LearnerConfig(num_workers=1, bucket_mb=256), GRPOConfig(),
                               total_steps=10, dtype="bfloat16")
        engines.ready(), learner.ready()
        plan = learner.weight_plan()
        host, port = learner.sender_address()
        ray.get(learner.open_weight_group("nccl", host, port, 2, 300) +
                engines.open_weight_group("nccl", host, port, 2, 300, plan))
        for version in range(1, 6):
            t = time.perf_counter()
            out = ray.get(learner.broadcast_weights(version) + engines.receive_weights(version))
            times.append(time.perf_counter() - t)
            inner.append(out[1])
        learner.shutdown()
        how = "learner rank 0 → engine over NCCL"
    else:
        from transformers import AutoModelForCausalLM

        engines.ready()
        named = {k: v.data for k, v in AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).named_parameters()}
        plan = weight_sync.plan_buckets([(k, v.dtype, tuple(v.shape)) for k, v in named.items()], 256 << 20)
        host, port = "127.0.0.1", weight_sync.free_port("127.0.0.1")
        group = common.open_beside(engines.open_weight_group("gloo", host, port, 2, 300, plan), host, port, 2, 0)
        buffers = weight_sync.PackBuffers(plan, "cpu")
        for version in range(1, 6):
            t = time.perf_counter()
            refs = engines.receive_weights(version)
            weight_sync.send(group, plan, version, (weight_sync.pack(b, named, "cpu", out=buffers.next(b))
                                                    for b in plan), "cpu")
            inner.append(ray.get(refs)[0])
            times.append(time.perf_counter() - t)
        how = "this process (CPU) → engine over gloo: one GPU, so no NCCL"
    engines.shutdown()
    best = min(range(1, len(times)), key=times.__getitem__)
    nbytes = sum(b.nbytes for b in plan)
    print(f"weight sync, Qwen2.5-0.5B shape ({nbytes / 1e9:.2f} GB bf16, {len(plan)} buckets), {how}: per sync "
          f"{' '.join(f'{t:.3f}' for t in times)} s; best after the first {times[best]:.3f} s "
          f"({nbytes / times[best] / 1e9:.1f} GB/s); engine side {json.dumps(inner[best])}")


def learner_mfu(model: str) -> None:
    g = torch.Generator().manual_seed(0)
    batch = [TrainSample(torch.randint(3, 500, (128,), generator=g).tolist(),
                         torch.randint(3, 500, (256,), generator=g).tolist(), [-1.0] * 256,
                         float(torch.randn(1, generator=g))) for _ in range(32)]
    learner = LearnerGroup(model, "cuda", LearnerConfig(num_workers=1, micro_batch_size=8, lr=1e-6), GRPOConfig(),
                           total_steps=10, dtype="bfloat16").ready()
    learner.train_step(batch, 1.0)
    seconds = []
    for _ in range(3):
        t = time.perf_counter()
        learner.train_step(batch, 1.0)
        seconds.append(time.perf_counter() - t)
    params = learner.infos[0]["params"]
    learner.shutdown()
    tokens = 32 * (128 + 256) / min(seconds)
    flops = 6 * params * tokens
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = f"MFU {flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known for this GPU"
    print(f"learner, Qwen2.5-0.5B shape ({params / 1e6:.0f}M params), ZeRO-2 bf16, 1 rank on {name}: "
          f"{tokens:.0f} tokens/s through forward+backward ({32 * 256 / min(seconds):.0f} completion tokens/s), "
          f"6·N·tokens/s = {flops / 1e12:.1f} TFLOP/s, {mfu}")


def main() -> None:
    gpus = torch.cuda.device_count()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    ray.cloudpickle.register_pickle_by_value(common)
    import vllm

    print(f"bench/gpu.py: {gpus} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}, vllm {vllm.__version__}")
    generation_ratio(resolve_model("builtin:smollm2-135m-instruct"))
    shaped = qwen25_05b_shaped()
    sync_seconds(shaped, gpus)
    learner_mfu(shaped)
    ray.shutdown()


if __name__ == "__main__":
    main()
