"""Learner benchmark, one run: GRPO training tokens/s of the DeepSpeed learner in Ray actors, and the weight
broadcast from rank 0 (pack + send, receiver just receiving) ÷ one raw flat gloo broadcast of the same bytes
between the same kind of processes.

    .venv/bin/python bench/learner.py [--ranks 1 --threads 2 --zero 2 --samples 32]
"""
import argparse
import time

import common
import ray
import torch

from launch.config import GRPOConfig, LearnerConfig
from learner.group import LearnerGroup
from core import weight_sync
from core.types import TrainSample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per rank")
    ap.add_argument("--zero", type=int, default=2, choices=[2, 3])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=32)
    args = ap.parse_args()
    model = common.bench_model()
    common.start_ray(num_cpus=max(4, args.ranks + 1))
    cfg = LearnerConfig(num_workers=args.ranks, threads=args.threads, zero_stage=args.zero, lr=1e-5,
                        micro_batch_size=8, bucket_mb=args.bucket_mb)
    learners = LearnerGroup(model, "cpu", cfg, GRPOConfig(), total_steps=100).ready()
    g = torch.Generator().manual_seed(0)
    batch = [TrainSample(torch.randint(3, 500, (args.prompt_len,), generator=g).tolist(),
                         torch.randint(3, 500, (args.completion_len,), generator=g).tolist(),
                         [-1.0] * args.completion_len, float(torch.randn(1, generator=g))) for _ in range(args.samples)]
    learners.train_step(batch, 1.0)  # warm-up
    seconds = []
    for _ in range(args.steps):
        t = time.perf_counter()
        m = learners.train_step(batch, 1.0)
        seconds.append(time.perf_counter() - t)
    step = min(seconds)
    total = args.samples * (args.prompt_len + args.completion_len)
    print(f"learner bench: random Qwen2 ~25M params, {args.ranks} rank(s) × {args.threads} thread(s), ZeRO-{args.zero}, "
          f"fp32; {args.samples} samples of {args.prompt_len}+{args.completion_len} tokens per step")
    print(f"  step {step:.2f} s (best of {args.steps}): {args.samples * args.completion_len / step:.0f} completion "
          f"tokens/s, {total / step:.0f} tokens/s through forward+backward (grad norm {m['grad_norm']:.3f})")

    plan = learners.weight_plan()
    nbytes = sum(b.nbytes for b in plan)
    host, port = learners.sender_address()
    group = common.open_beside(learners.open_weight_group("gloo", host, port, 2, 120), host, port, 2, 1)
    buffers = [torch.empty(b.numel, dtype=getattr(torch, b.dtype)) for b in plan]
    times = []
    for version in range(1, args.steps + 3):
        start = time.perf_counter()
        refs = learners.broadcast_weights(version)
        for _ in weight_sync.receive(group, plan, "cpu", expect_version=version, buffers=buffers):
            pass
        ray.get(refs)
        times.append(time.perf_counter() - start)
    ours = min(times[2:])
    raw = common.raw_broadcast_seconds(nbytes // 4, repeats=args.steps, driver_sends=False)
    print(f"  weight broadcast of {nbytes / 2**20:.0f} MiB in {len(plan)} bucket(s), best of {args.steps} after 2 "
          f"warm-ups: {ours:.3f} s; one raw flat gloo broadcast of the same bytes: {raw:.3f} s; ratio {ours / raw:.2f}")
    learners.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
