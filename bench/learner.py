"""Learner benchmark, one run (ratios within the run: these machines are noisy):

1. Memory of one micro-batch's logprobs at Qwen's vocabulary (151,936), before and after chunking. "Before" is the
   implementation that made the whole [B, C, V] logits and took log-softmax and entropy over them
   (`BaselineWorker` below, kept as the baseline); "after" is `LearnerWorker._completion_logprobs`. Each runs in a
   fresh subprocess: a random Qwen2 (hidden 64, 2 layers, tied embeddings, ~10M parameters, nearly all in the
   embedding), one micro-batch of 8 × (64 prompt + 256 completion) tokens, forward, GRPO loss, backward, entropy.
   The figure is the process's peak resident memory after the micro-batch (`ru_maxrss`: the kernel's high-water
   mark, which sees every allocation, torch's included, with no tracing overhead) minus its resident memory just
   before it (VmRSS): what the micro-batch itself costs. The "before" process peaks near 5 GiB.
2. Learner CPU tokens/s through DeepSpeed in Ray actors, before and after, at vocabulary 151,936 (a random Qwen2 of
   hidden 256, 4 layers), same batch: chunking recomputes the output head in backward, so it costs time here.
3. At the small bench model (vocabulary 512, ~25M params): GRPO training tokens/s, and the weight broadcast from
   rank 0 (pack + send, receiver just receiving) ÷ one raw flat gloo broadcast of the same bytes.
4. `learner.layout` on GSM8K-shaped work (prompts of 170 tokens, completions of 40-128, groups of 8 and of 16, the
   CPU default's model SmolLM2-135M, gradient checkpointing as its preset): completion tokens/s of a train step
   (forward+backward+optimizer, best of --steps after a warm-up) and peak memory, a fresh learner per layout
   (on CPU the peak is the process's RSS high-water mark): padded (a row per sample: each prompt once per sample),
   shared (each prompt once per micro-batch), packed (one row per micro-batch), and the ratios to padded.

5. Gradient checkpointing and micro-batch size on the CPU default's work (SmolLM2-135M, fp32, groups of 8 of
   GSM8K-shaped samples, `learner.layout: auto`): completion tokens/s of a train step (best of --steps after a
   warm-up) and peak RSS, a fresh learner per setting; how the CPU preset's setting was chosen.

    .venv/bin/python bench/learner.py [--ranks 1 --threads 2 --zero 2 --samples 32] [--part layouts|checkpointing]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import common
import ray
import torch

from core import weight_sync
from core.types import TrainSample
from core.config import GRPOConfig, LearnerConfig
from learner import grpo
from learner.group import LearnerGroup
from learner.worker import LearnerWorker

QWEN_VOCAB = 151_936


class BaselineWorker(LearnerWorker):
    """The learner before chunking: the whole [B, C, V] logits, log-softmax and entropy over them in fp32 (rows
    padded: parts 1 and 2 compare chunking alone, both sides with `learner.layout: padded`)."""

    def _logits(self, model, batch) -> torch.Tensor:
        C = batch["mask"].shape[1]
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False).logits[:, :-1]

    def _completion_logprobs(self, model, batch, temperature, with_entropy=False):
        logits = self._logits(model, batch)
        lp = grpo.token_logprobs(logits, batch["input_ids"][:, -logits.shape[1]:], temperature)
        return lp, grpo.entropy(logits, temperature) if with_entropy else None


def wide_vocab_model(hidden: int, layers: int, vocab: int = QWEN_VOCAB) -> str:
    """A random Qwen2 with Qwen's vocabulary size (weights and config only: the learner needs no tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from core.models import _atomic_build, cache_dir

    def build(path):
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, dtype="float32")
        Qwen2ForCausalLM(config).save_pretrained(path)

    return str(_atomic_build(cache_dir() / f"bench-qwen2-v{vocab}-h{hidden}-l{layers}", build))


def make_batch(n: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[TrainSample]:
    g = torch.Generator().manual_seed(seed)
    return [TrainSample(torch.randint(3, 500, (prompt_len,), generator=g).tolist(),
                        torch.randint(3, 500, (completion_len,), generator=g).tolist(),
                        [-1.0] * completion_len, float(torch.randn(1, generator=g))) for _ in range(n)]


def resident_kib() -> int:
    """This process's resident memory now (ru_maxrss is the peak so far; both in KiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def one_microbatch_memory(which: str, model_path: str, samples: int, prompt_len: int, completion_len: int) -> dict:
    """In this (fresh) process: one micro-batch's forward, loss, backward and entropy; peak RSS growth in MiB."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    worker = BaselineWorker.__new__(BaselineWorker)  # its _collate and both logprob paths, without DeepSpeed
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    worker.pad_id, worker.device, worker.chunk = 0, "cpu", grpo.chunk_positions(model.config.vocab_size)
    worker.layout, worker.attention = "padded", "sdpa"
    batch = worker._collate(make_batch(samples, prompt_len, completion_len))
    base = resident_kib()
    if which == "before":  # in the order train_step had: logits alive through backward, entropy after it
        logits = worker._logits(model, batch)
        lp = grpo.token_logprobs(logits, batch["input_ids"][:, -logits.shape[1]:], 1.0)
    else:
        lp, ent = LearnerWorker._completion_logprobs(worker, model, batch, 1.0, with_entropy=True)
    loss, _ = grpo.policy_loss(lp, lp.detach(), batch["adv"], batch["mask"])
    grpo.aggregate(loss, batch["mask"], "token_mean", float(batch["mask"].sum())).backward()
    if which == "before":
        ent = grpo.entropy(logits, 1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak / 1024, "growth_mib": (peak - base) / 1024, "entropy": float(ent.mean())}


def memory_before_after(args) -> None:
    model = wide_vocab_model(hidden=64, layers=2)
    shape = dict(samples=8, prompt_len=64, completion_len=args.memory_completion_len)
    got = {}
    for which in ("before", "after"):
        out = subprocess.run([sys.executable, __file__, "--one-microbatch", which, model, json.dumps(shape)],
                             capture_output=True, text=True, check=True)
        got[which] = json.loads(out.stdout.strip().splitlines()[-1])
    b, a = got["before"], got["after"]
    gib = 8 * (shape["completion_len"] + 1) * QWEN_VOCAB * 4 / 2**30
    print(f"logprob memory of one micro-batch, vocabulary {QWEN_VOCAB:,}, 8 × ({shape['prompt_len']} + "
          f"{shape['completion_len']}) tokens (one fp32 [B, C+1, V] copy is {gib:.2f} GiB), fresh processes:")
    print(f"  before (whole logits): +{b['growth_mib']:.0f} MiB (process peak {b['peak_mib']:.0f} MiB)")
    print(f"  after  (chunked)     : +{a['growth_mib']:.0f} MiB (process peak {a['peak_mib']:.0f} MiB)")
    print(f"  ratio before / after = {b['growth_mib'] / a['growth_mib']:.1f}  (mean entropy {b['entropy']:.6f} vs "
          f"{a['entropy']:.6f})")


def train_tokens_per_s(model: str, cfg: LearnerConfig, batch: list[TrainSample], steps: int,
                       worker_cls=LearnerWorker) -> tuple[float, LearnerGroup, dict]:
    learners = LearnerGroup(model, "cpu", cfg, GRPOConfig(), total_steps=100, worker_cls=worker_cls).ready()
    learners.train_step(batch, 1.0)  # warm-up
    seconds = []
    for _ in range(steps):
        t = time.perf_counter()
        m = learners.train_step(batch, 1.0)
        seconds.append(time.perf_counter() - t)
    return sum(len(s.completion_ids) for s in batch) / min(seconds), learners, m


def layout_rates(args) -> None:
    from core.models import resolve_model
    from reference import gsm8k_shaped

    model = resolve_model(args.layout_model)
    micro = args.layout_samples
    print(f"learner.layout, {args.layout_model}: {args.layout_samples} samples per step in one micro-batch, prompts "
          f"of {args.layout_prompt_len}, completions {args.layout_shortest}-{args.layout_longest} tokens; "
          f"{args.ranks} rank(s) × {args.threads} thread(s), ZeRO-{args.zero}, fp32, gradient checkpointing "
          f"{'on' if args.layout_checkpointing else 'off'}, best of {args.steps} after a warm-up", flush=True)
    for n in args.groups_of:
        batch = gsm8k_shaped(args.layout_samples // n, n, args.layout_prompt_len, args.layout_shortest,
                             args.layout_longest)
        tokens = sum(len(s.completion_ids) for s in batch)
        got = {}
        for layout in ("padded", "shared", "packed") if micro > n else ("padded", "shared"):
            cfg = LearnerConfig(num_workers=args.ranks, threads=args.threads, zero_stage=args.zero, lr=1e-6,
                                micro_batch_size=micro, gradient_checkpointing=args.layout_checkpointing,
                                layout=layout)
            rate, learners, m = train_tokens_per_s(model, cfg, batch, args.steps)
            assert learners.infos[0]["layout"] == layout, learners.infos[0]
            learners.shutdown()
            got[layout] = (rate, m.learner_peak_gib, m.loss)  # CPU: the peak is the process's high-water mark
        line = ", ".join(f"{k} {rate:.0f} tok/s (peak {peak:.2f} GiB)" for k, (rate, peak, _) in got.items())
        ratios = ", ".join(f"{k} ÷ padded {got[k][0] / got['padded'][0]:.2f}×" for k in got if k != "padded")
        losses = " = ".join(f"{loss:+.6f}" for _, _, loss in got.values())
        print(f"  groups of {n:>2} ({len(batch) // n} prompt(s), {tokens} completion tokens): {line}; {ratios}; "
              f"losses {losses}", flush=True)


def checkpointing_rates(args) -> None:
    from core.models import resolve_model
    from reference import gsm8k_shaped

    model = resolve_model(args.layout_model)
    batch = gsm8k_shaped(args.ckpt_samples // 8, 8, args.layout_prompt_len, args.layout_shortest,
                         args.layout_longest)
    tokens = sum(len(s.completion_ids) for s in batch)
    print(f"gradient checkpointing × micro-batch, {args.layout_model}: {len(batch)} samples per step (groups of 8, "
          f"prompts of {args.layout_prompt_len}, completions {args.layout_shortest}-{args.layout_longest}, {tokens} "
          f"completion tokens), layout auto; {args.ranks} rank(s) × {args.threads} thread(s), ZeRO-{args.zero}, "
          f"fp32, best of {args.steps} after a warm-up, a fresh learner each", flush=True)
    print("| checkpointing | micro-batch | completion tok/s | peak RSS GiB | loss |\n|---|---|---|---|---|", flush=True)
    got = {}
    for checkpointing in (1, 0):
        for micro in args.micro_batches:
            cfg = LearnerConfig(num_workers=args.ranks, threads=args.threads, zero_stage=args.zero, lr=1e-6,
                                micro_batch_size=micro, gradient_checkpointing=bool(checkpointing))
            rate, learners, m = train_tokens_per_s(model, cfg, batch, args.steps)
            learners.shutdown()
            got[checkpointing, micro] = rate
            print(f"| {'on' if checkpointing else 'off'} | {micro} | {rate:.0f} | {m.learner_peak_gib:.2f} | "
                  f"{m.loss:+.6f} |", flush=True)
    best = max(got, key=got.get)
    base = got.get((1, 8), next(iter(got.values())))
    print(f"  fastest: checkpointing {'on' if best[0] else 'off'}, micro-batch {best[1]}: {got[best] / base:.2f}× "
          f"checkpointing on at micro-batch 8", flush=True)


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
    ap.add_argument("--memory-completion-len", type=int, default=256)
    ap.add_argument("--part", choices=["all", "layouts", "checkpointing"], default="all")
    ap.add_argument("--layout-model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--layout-samples", type=int, default=16, help="per step, all in one micro-batch")
    ap.add_argument("--groups-of", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--layout-prompt-len", type=int, default=170)
    ap.add_argument("--layout-shortest", type=int, default=40)
    ap.add_argument("--layout-longest", type=int, default=128)
    ap.add_argument("--layout-checkpointing", type=int, default=1, choices=[0, 1])
    ap.add_argument("--ckpt-samples", type=int, default=16, help="part 5: samples per step, groups of 8")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16], help="part 5")
    ap.add_argument("--one-microbatch", nargs=3, metavar=("WHICH", "MODEL", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_microbatch:
        which, model, shape = args.one_microbatch
        print(json.dumps(one_microbatch_memory(which, model, **json.loads(shape))))
        return
    common.start_ray(num_cpus=max(4, args.ranks + 1))
    if args.part == "checkpointing":
        checkpointing_rates(args)
        ray.shutdown()
        return
    layout_rates(args)
    if args.part == "layouts":
        ray.shutdown()
        return
    memory_before_after(args)

    cfg = LearnerConfig(num_workers=args.ranks, threads=args.threads, zero_stage=args.zero, lr=1e-5,
                        micro_batch_size=8, bucket_mb=args.bucket_mb, layout="padded")
    wide = wide_vocab_model(hidden=256, layers=4)
    wide_batch = make_batch(16, args.prompt_len, args.completion_len)
    rates = {}
    for name, cls in (("before", BaselineWorker), ("after", LearnerWorker)):
        rates[name], group, _ = train_tokens_per_s(wide, cfg, wide_batch, args.steps, cls)
        group.shutdown()
    print(f"learner CPU completion tokens/s at vocabulary {QWEN_VOCAB:,} (random Qwen2 hidden 256, 4 layers; "
          f"16 samples of {args.prompt_len}+{args.completion_len}; {args.ranks} rank(s) × {args.threads} "
          f"thread(s), ZeRO-{args.zero}, best of {args.steps}): before {rates['before']:.0f}, after "
          f"{rates['after']:.0f}, ratio after / before {rates['after'] / rates['before']:.2f}")

    batch = make_batch(args.samples, args.prompt_len, args.completion_len)
    rate, learners, m = train_tokens_per_s(common.bench_model(), cfg, batch, args.steps)
    total = args.samples * (args.prompt_len + args.completion_len)
    step = args.samples * args.completion_len / rate
    print(f"learner bench: random Qwen2 ~25M params, {args.ranks} rank(s) × {args.threads} thread(s), ZeRO-{args.zero}, "
          f"fp32; {args.samples} samples of {args.prompt_len}+{args.completion_len} tokens per step")
    print(f"  step {step:.2f} s (best of {args.steps}): {rate:.0f} completion tokens/s, {total / step:.0f} tokens/s "
          f"through forward+backward (grad norm {m.grad_norm:.3f})")

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
    checkpointing_rates(args)
    ray.shutdown()


if __name__ == "__main__":
    main()
