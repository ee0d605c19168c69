"""A rollout batch → per-rank shards, and per-rank sums → batch metrics: the learner's pure arithmetic, without
Ray (scripts/gpu_check.py drives the learner ranks as plain processes with it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.balance import split_balanced
from core.types import LearnerStats, TrainSample, TrainShard
from learner.layout import by_prompt


def make_shards(samples: list[TrainSample], world_size: int, micro_batch_size: int, minibatches: int,
                temperature: float, max_tokens: int = 0) -> list[TrainShard]:
    """Split a rollout batch into `minibatches` consecutive minibatches, each spread over the ranks by token count.

    The unit spread is a prompt's samples, up to a micro-batch of them, so that a micro-batch holds whole pieces of
    groups and computes each prompt once (`learner.layout`). Every rank makes the same number of micro-batch passes
    per minibatch (empty ones where it has fewer samples), which DeepSpeed's collectives need; the global
    token/sequence counts make the loss independent of the split.
    """
    if not samples:
        raise ValueError("make_shards: no samples")
    size = math.ceil(len(samples) / min(minibatches, len(samples)))
    minibatches = math.ceil(len(samples) / size)  # e.g. 9 samples in 4 asks → 3 of 3, never an empty one
    per_rank: list[list[list[TrainSample]]] = [[] for _ in range(world_size)]
    tokens, seqs, micro = [], [], []
    for k in range(minibatches):
        mb = samples[k * size:(k + 1) * size]
        pieces = prompt_pieces(mb, micro_batch_size)
        parts = split_balanced([len(p[0].prompt_ids) + sum(len(s.completion_ids) for s in p) for p in pieces],
                               world_size)
        parts = [[s for i in part for s in pieces[i]] for part in parts]
        for r, part in enumerate(parts):
            per_rank[r].append(part)
        tokens.append(sum(s.model_tokens for s in mb))  # the model's tokens: environment tokens carry no loss
        seqs.append(len(mb))
        micro.append(max(1, max(math.ceil(len(p) / micro_batch_size) for p in parts)))
    return [TrainShard(per_rank[r], tokens, seqs, micro, temperature, max_tokens) for r in range(world_size)]


def prompt_pieces(samples: list[TrainSample], size: int) -> list[list[TrainSample]]:
    """The samples by prompt (in order of first appearance), each prompt's cut into pieces of at most `size`."""
    return [[samples[i] for i in group[j:j + size]] for group in by_prompt(samples).values()
            for j in range(0, len(group), size)]


@dataclass
class RankSums:
    """One rank's part of a train step: sums, to be added over the ranks, and the values every rank shares."""

    tokens: float = 0.0
    seqs: float = 0.0
    loss: float = 0.0  # the sum of this rank's shares of each minibatch loss
    clipped_tokens: float = 0.0
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    ratio_min: float = float("inf")
    kl_sum: float = 0.0
    entropy_sum: float = 0.0
    mismatch_sum: float = 0.0  # |learner − vLLM| logprob, over the tokens of mismatch_tokens
    mismatch_tokens: float = 0.0
    mismatch_kl_sum: float = 0.0
    is_capped_tokens: float = 0.0
    nonfinite_microbatches: int = 0
    skipped_steps: int = 0
    steps: int = 0  # optimizer steps
    grad_norm: float = float("nan")
    lr: float = 0.0
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0


SUMMED = ("tokens", "seqs", "loss", "clipped_tokens", "ratio_sum", "kl_sum", "entropy_sum", "mismatch_sum",
          "mismatch_tokens", "mismatch_kl_sum", "is_capped_tokens")


def reduce_metrics(per_rank: list[RankSums]) -> LearnerStats:
    """Every rank's sums → the step's statistics (means per token unless named otherwise)."""
    tot = {k: sum(getattr(m, k) for m in per_rank) for k in SUMMED}
    n = max(tot["tokens"], 1.0)
    first = per_rank[0]
    return LearnerStats(
        loss=tot["loss"] / max(first.steps, 1),
        clip_frac=tot["clipped_tokens"] / n,
        ratio_mean=tot["ratio_sum"] / n,
        ratio_max=max(m.ratio_max for m in per_rank),
        ratio_min=min(m.ratio_min for m in per_rank),
        kl=tot["kl_sum"] / n,
        entropy=tot["entropy_sum"] / n,
        logprob_mismatch=tot["mismatch_sum"] / max(tot["mismatch_tokens"], 1.0),
        mismatch_kl=tot["mismatch_kl_sum"] / n,
        is_capped_frac=tot["is_capped_tokens"] / n,
        grad_norm=first.grad_norm,
        lr=first.lr,
        optimizer_steps=first.steps,
        skipped_steps=first.skipped_steps,
        nonfinite_microbatches=first.nonfinite_microbatches,
        train_tokens=tot["tokens"],
        train_seqs=tot["seqs"],
        train_seconds=max(m.train_seconds for m in per_rank),
        learner_peak_gib=max(m.peak_memory_bytes for m in per_rank) / 2**30,
    )
