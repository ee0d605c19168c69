"""GRPO as pure tensor functions: group advantages, token logprobs, the clipped surrogate, KL, aggregation.

No Ray, vLLM or DeepSpeed here; `tests/test_grpo.py` checks every branch against hand-computed numbers.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [groups, n] → advantages [groups, n]: (r − group mean) / (group std + eps).

    The std is the unbiased one (as TRL and OpenRLHF use). `scale=False` skips the division (Dr.GRPO).
    A group whose rewards are all equal gets zero advantages either way.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, n>=2], got {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, without materialising the full log-softmax.

    Dividing by the sampling temperature makes these comparable with vLLM's `processed_logprobs`.
    """
    z = logits.float() / temperature
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position: logsumexp(z) − Σ p·z."""
    z = logits.float() / temperature
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def chunk_positions(vocab_size: int, chunk_elements: int = 1 << 25) -> int:
    """Positions per chunk so that one chunk of fp32 logits holds about `chunk_elements` values (128 MiB)."""
    return max(1, chunk_elements // vocab_size)


def chunked_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float = 1.0,
                     chunk: int = 256, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` (and `entropy`) of head(hidden), computed `chunk` positions at a time.

    hidden [B, C, H]; head maps [N, H] → logits [N, V]; targets [B, C]. The result equals the two functions above
    applied to the whole [B, C, V] logits, but no more than one chunk of logits exists at once: when gradients are
    on and there are several chunks, each is recomputed in backward (activation checkpointing) instead of being
    kept for it, which costs one more pass of the head. Entropy is a no-grad statistic.
    """
    B, C, H = hidden.shape
    flat, flat_targets = hidden.reshape(B * C, H), targets.reshape(B * C)

    def one_chunk(h: torch.Tensor, t: torch.Tensor):
        logits = head(h)
        lp = token_logprobs(logits, t, temperature)  # first: the recomputation in backward stops after it
        return lp, entropy(logits, temperature) if with_entropy else logits.new_empty(0)

    # One chunk is within the budget by definition: autograd keeps it, nothing is recomputed.
    checkpointed = torch.is_grad_enabled() and flat.requires_grad and B * C > chunk
    lps, ents = [], []
    for start in range(0, B * C, chunk):
        h, t = flat[start:start + chunk], flat_targets[start:start + chunk]
        lp, ent = checkpoint(one_chunk, h, t, use_reentrant=False) if checkpointed else one_chunk(h, t)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps).view(B, C)
    return lp, torch.cat(ents).view(B, C) if with_entropy else None


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): exp(ref − lp) − (ref − lp) − 1 (≥ 0, unbiased, low variance)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def importance_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str = "token", cap: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights [B, T] for the gap between the engine that sampled and the learner's policy
    (different kernels and dtypes, and a step of staleness when generation runs ahead), detached.

    token:    w = min(π_old / π_engine, cap) per token (TIS, as verl, OpenRLHF, slime);
    seq_mask: w = 1, or 0 for a whole sequence whose geometric-mean ratio exp(mean_t log(π_old / π_engine)) lies
              outside [1/cap, cap] (sequence-level masking);
    off:      w = 1.
    Statistics, summed over masked tokens: `capped` (tokens truncated or masked out) and `mismatch_kl`, the k3
    estimate of KL(π_engine ‖ π_old) from the engine's own samples: r − 1 − log r with r = π_old / π_engine (≥ 0).
    """
    mask = mask.to(old_logprobs.dtype)
    log_r = (old_logprobs - engine_logprobs).detach()
    stats = {"mismatch_kl": ((torch.exp(log_r) - 1 - log_r) * mask).sum()}
    if mode == "off":
        weights = torch.ones_like(log_r)
        stats["capped"] = torch.zeros((), dtype=log_r.dtype)
    elif mode == "token":
        ratio = torch.exp(log_r)
        weights = torch.clamp(ratio, max=cap)
        stats["capped"] = ((ratio > cap).to(mask.dtype) * mask).sum()
    elif mode == "seq_mask":
        mean_log_r = (log_r * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        keep = (mean_log_r.abs() <= torch.log(torch.tensor(cap, dtype=log_r.dtype))).to(log_r.dtype)
        weights = keep.unsqueeze(-1).expand_as(log_r)
        stats["capped"] = ((1 - weights) * mask).sum()
    else:
        raise ValueError(f"importance correction must be token, seq_mask or off, got {mode!r}")
    return weights, stats


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                beta: float = 0.0, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped-surrogate loss [batch, T] and summed statistics.

    ratio = exp(lp − old); loss = −w·min(ratio·A, clip(ratio, 1−clip_low, 1+clip_high)·A) + beta·k3, where w are the
    detached importance weights (`importance_weights`; 1 when None). `advantages` is per sequence [batch] (or per
    token [batch, T]). Statistics are sums over masked tokens, so they can be added across micro-batches and ranks
    before dividing by the token count.
    """
    mask = mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if weights is not None:
        loss = loss * weights.detach()
    stats = {
        "clipped_tokens": ((clipped < unclipped).to(mask.dtype) * mask).sum().detach(),
        "ratio_sum": (ratio * mask).sum().detach(),
        "ratio_max": torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max().detach(),
        "ratio_min": torch.where(mask > 0, ratio, torch.full_like(ratio, float("inf"))).min().detach(),
    }
    if ref_logprobs is not None and beta > 0:
        kl = kl_k3(logprobs, ref_logprobs)
        loss = loss + beta * kl
        stats["kl_sum"] = (kl * mask).sum().detach()
    return loss, stats


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str, denominator: float) -> torch.Tensor:
    """Sum a micro-batch's per-token loss into its share of the minibatch loss.

    token_mean:     Σ loss·mask / (completion tokens in the whole minibatch);
    seq_mean:       Σ_seq (Σ_t loss·mask / seq length) / (sequences in the whole minibatch);
    token_sum_norm: Σ loss·mask / (sequences in the whole minibatch × max_tokens), a constant per sequence
                    (Dr.GRPO: no length normalisation that favours long wrong answers; with grpo.scale_rewards false).
    `denominator` is that count for the whole minibatch (all micro-batches, all ranks; see `loss_denominator`), so the
    shares add up to the minibatch mean however the batch is split.
    """
    mask = mask.to(loss.dtype)
    if agg in ("token_mean", "token_sum_norm"):
        return (loss * mask).sum() / denominator
    if agg == "seq_mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / denominator
    raise ValueError(f"loss aggregation must be token_mean, seq_mean or token_sum_norm, got {agg!r}")


def loss_denominator(agg: str, tokens: int, seqs: int, max_tokens: int) -> float:
    """The minibatch-wide count that `aggregate` divides by."""
    return {"token_mean": tokens, "seq_mean": seqs, "token_sum_norm": seqs * max_tokens}[agg]


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_tokens − buffer tokens, then falling linearly
    to −1 at max_tokens (and −1 beyond)."""
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / buffer)
