"""A rollout batch → per-rank shards, and per-rank sums → batch metrics: the learner's pure arithmetic, without
Ray (scripts/gpu_check.py drives the learner ranks as plain processes with it)."""
from __future__ import annotations

import math

from core.balance import split_balanced
from core.types import TrainSample, TrainShard


def make_shards(samples: list[TrainSample], world_size: int, micro_batch_size: int, minibatches: int,
                temperature: float, max_tokens: int = 0) -> list[TrainShard]:
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
    return [TrainShard(per_rank[r], tokens, seqs, micro, temperature, max_tokens) for r in range(world_size)]


def reduce_metrics(per_rank: list[dict]) -> dict:
    """Sums from every rank → batch metrics (means per token unless named otherwise)."""
    tot = {k: sum(m[k] for m in per_rank) for k in ("tokens", "seqs", "loss", "clipped_tokens", "ratio_sum",
                                                    "kl_sum", "entropy_sum", "mismatch_sum", "mismatch_tokens",
                                                    "mismatch_kl_sum", "is_capped_tokens")}
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
        "mismatch_kl": tot["mismatch_kl_sum"] / n,  # k3 KL(π_vLLM ‖ π_old) per token, over every minibatch
        "is_capped_frac": tot["is_capped_tokens"] / n,  # tokens whose importance weight was truncated or masked
        "grad_norm": first["grad_norm"],
        "lr": first["lr"],
        "optimizer_steps": first["steps"],
        "skipped_steps": first["skipped_steps"],
        "nonfinite_microbatches": first["nonfinite_microbatches"],
        "train_tokens": tot["tokens"],
        "train_seqs": tot["seqs"],
        "train_seconds": max(m["train_seconds"] for m in per_rank),
        # the largest rank's peak this step (CUDA: allocated tensors; CPU: the process's peak RSS so far)
        "learner_peak_gib": max(m["peak_memory_bytes"] for m in per_rank) / 2**30,
    }
