"""GRPO math, LR schedule and batch sharding: pure functions against hand-computed numbers."""
import math

import pytest
import torch

from learner import grpo
from learner.group import make_shards, reduce_metrics
from learner.shards import RankSums
from learner.worker import lr_multiplier
from core.types import TrainSample


def test_group_advantages_scaled_by_unbiased_std():
    adv = grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    # mean 0.5; unbiased std sqrt(4 * 0.25 / 3) = 0.57735; ±0.5 / 0.57735 = ±0.866025
    assert adv.tolist()[0] == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_group_advantages_dr_grpo_skips_std():
    adv = grpo.group_advantages(torch.tensor([[3.0, 1.0], [2.0, 2.0]]), scale=False)
    assert adv.tolist() == [[1.0, -1.0], [0.0, 0.0]]


def test_group_advantages_equal_rewards_give_zero():
    adv = grpo.group_advantages(torch.tensor([[0.7, 0.7, 0.7]]))
    assert adv.abs().max().item() == 0.0


def test_group_advantages_rejects_bad_shape():
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.tensor([[1.0]]))


def test_token_logprobs_with_temperature():
    logits = torch.tensor([[[0.0, math.log(2.0)]]])
    target = torch.tensor([[1]])
    assert grpo.token_logprobs(logits, target).item() == pytest.approx(math.log(2 / 3), abs=1e-6)
    # T=2: softmax([0, ln2/2]) → p1 = √2 / (1 + √2) = 0.585786
    assert grpo.token_logprobs(logits, target, 2.0).item() == pytest.approx(math.log(0.585786), abs=1e-6)


def test_token_logprobs_equals_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(grpo.token_logprobs(logits, targets, 0.7), ref, atol=1e-6)


def test_entropy():
    assert grpo.entropy(torch.zeros(1, 1, 2)).item() == pytest.approx(math.log(2), abs=1e-6)
    assert grpo.entropy(torch.tensor([[[0.0, 100.0]]])).item() == pytest.approx(0.0, abs=1e-6)


def test_chunk_positions():
    assert grpo.chunk_positions(151_936) == 220  # 2^25 fp32 logits: 128 MiB per chunk
    assert grpo.chunk_positions(10, chunk_elements=25) == 2 and grpo.chunk_positions(10**9) == 1


def _old_logprobs_and_entropy(hidden, head, targets, temperature):
    """Today's implementation before chunking: the whole [B, C, V] logits, then the two functions."""
    logits = head(hidden)
    return grpo.token_logprobs(logits, targets, temperature), grpo.entropy(logits, temperature)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])  # one position, dividing, not dividing, one chunk for all
def test_chunked_logprobs_equal_the_whole_logits_with_gradients(chunk):
    torch.manual_seed(0)
    B, C, H, V, T = 3, 5, 8, 50, 0.7
    head = torch.nn.Linear(H, V, bias=True)
    hidden = torch.randn(B, C, H, requires_grad=True)
    targets = torch.randint(0, V, (B, C))
    weights = torch.randn(B, C)  # an arbitrary loss on top, so every position's gradient differs

    old_lp, old_ent = _old_logprobs_and_entropy(hidden, head, targets, T)
    old_grads = torch.autograd.grad((old_lp * weights).sum(), [hidden, head.weight, head.bias])
    lp, ent = grpo.chunked_logprobs(hidden, head, targets, T, chunk=chunk, with_entropy=True)
    grads = torch.autograd.grad((lp * weights).sum(), [hidden, head.weight, head.bias])

    assert lp.shape == ent.shape == (B, C) and lp.requires_grad and not ent.requires_grad
    assert (lp - old_lp).abs().max() < 1e-6 and (ent - old_ent).abs().max() < 1e-6
    for g, old in zip(grads, old_grads):
        assert old.abs().max() > 1e-3 and (g - old).abs().max() < 1e-6


def test_chunked_logprobs_hand_checked_and_without_graph():
    # One position, logits [0, ln 2]: p = [1/3, 2/3]; entropy ln 3 − (2/3) ln 2 = 0.636514
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [math.log(2.0)]]))
    hidden, target = torch.ones(1, 1, 1), torch.tensor([[1]])
    with torch.no_grad():
        lp, ent = grpo.chunked_logprobs(hidden, head, target, with_entropy=True)
    assert lp.item() == pytest.approx(math.log(2 / 3), abs=1e-6)
    assert ent.item() == pytest.approx(0.636514, abs=1e-6)
    assert not lp.requires_grad
    assert grpo.chunked_logprobs(hidden, head, target)[1] is None


def test_kl_k3():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # d = ref − lp = −ln 2: exp(−ln 2) + ln 2 − 1 = 0.193147
    assert grpo.kl_k3(lp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    assert grpo.kl_k3(lp, lp).item() == 0.0


def _loss(ratio, adv, clip_low=0.2, clip_high=0.2, **kw):
    lp = torch.tensor([[math.log(ratio)]])
    loss, stats = grpo.policy_loss(lp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), clip_low, clip_high,
                                   **kw)
    return loss.item(), stats


@pytest.mark.parametrize("ratio,adv,expected,clipped", [
    (1.5, 1.0, -1.2, 1),   # positive advantage, ratio above 1+clip_high: clipped to 1.2
    (1.5, -1.0, 1.5, 0),   # negative advantage, ratio above: unclipped term is the minimum
    (0.5, 1.0, -0.5, 0),   # positive advantage, ratio below: unclipped term is the minimum
    (0.5, -1.0, 0.8, 1),   # negative advantage, ratio below 1−clip_low: clipped to 0.8
    (1.1, 1.0, -1.1, 0),   # inside the trust region
])
def test_policy_loss_clip_branches(ratio, adv, expected, clipped):
    value, stats = _loss(ratio, adv)
    assert value == pytest.approx(expected, abs=1e-6)
    assert stats["clipped_tokens"].item() == clipped
    assert stats["ratio_sum"].item() == pytest.approx(ratio, abs=1e-6)


def test_policy_loss_clip_higher():
    assert _loss(1.25, 1.0, clip_high=0.2)[0] == pytest.approx(-1.2, abs=1e-6)
    assert _loss(1.25, 1.0, clip_high=0.28)[0] == pytest.approx(-1.25, abs=1e-6)
    assert _loss(0.75, -1.0, clip_low=0.2, clip_high=0.28)[0] == pytest.approx(0.8, abs=1e-6)


def test_policy_loss_kl_term():
    lp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    loss, stats = grpo.policy_loss(lp, lp.clone(), torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * 0.193147, abs=1e-6)
    assert stats["kl_sum"].item() == pytest.approx(0.193147, abs=1e-6)
    _, no_kl = grpo.policy_loss(lp, lp.clone(), torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, beta=0.0)
    assert "kl_sum" not in no_kl


def test_policy_loss_gradient_is_advantage_at_ratio_one():
    lp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = grpo.policy_loss(lp, lp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    loss.sum().backward()
    assert lp.grad.tolist() == [[-2.0, -2.0]]  # d/dlp of −ratio·A at ratio 1 is −A


def test_policy_loss_masked_tokens_excluded_from_stats():
    lp = torch.tensor([[math.log(1.5), math.log(3.0)]])
    _, stats = grpo.policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["clipped_tokens"].item() == 1


def test_aggregate_token_and_seq_mean():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(loss, mask, "token_mean", 3).item() == pytest.approx(7 / 3)
    assert grpo.aggregate(loss, mask, "seq_mean", 2).item() == pytest.approx((1.5 + 4.0) / 2)
    with pytest.raises(ValueError):
        grpo.aggregate(loss, mask, "sum", 1)


def test_aggregate_shares_add_up_across_micro_batches():
    torch.manual_seed(0)
    loss, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()
    for agg, denom in (("token_mean", mask.sum().item()), ("seq_mean", 6)):
        whole = grpo.aggregate(loss, mask, agg, denom)
        parts = sum(grpo.aggregate(loss[i:i + 2], mask[i:i + 2], agg, denom) for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_importance_weights_token_truncation_by_hand():
    # old − engine log-ratios: ln 0.5, 0, ln 3 (capped at 2), and a masked token with ln 10
    old = torch.tensor([[math.log(0.5), 0.0, math.log(3.0), math.log(10.0)]])
    engine = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, stats = grpo.importance_weights(old, engine, mask, "token", cap=2.0)
    assert w[0].tolist() == pytest.approx([0.5, 1.0, 2.0, 2.0])
    assert stats["capped"].item() == 1  # only the unmasked ln 3 token
    # k3 = r − 1 − ln r: 0.5 − 1 + ln 2 = 0.193147; 0; 3 − 1 − ln 3 = 0.901388; the masked token does not count
    assert stats["mismatch_kl"].item() == pytest.approx(0.193147 + 0.901388, abs=1e-5)


def test_importance_weights_sequence_mask_by_hand():
    # sequence 0: mean log-ratio (ln 3 + 0) / 2 = 0.549 < ln 2 = 0.693: kept; sequence 1: (ln 3 + ln 3) / 2 > ln 2:
    # masked, both tokens; sequence 2: mean −ln 3 over its one unmasked token: below −ln 2, masked
    old = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), math.log(3.0)], [-math.log(3.0), 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    w, stats = grpo.importance_weights(old, torch.zeros(3, 2), mask, "seq_mask", cap=2.0)
    assert w.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert stats["capped"].item() == 3  # 2 tokens of sequence 1 and the 1 unmasked token of sequence 2
    off, off_stats = grpo.importance_weights(old, torch.zeros(3, 2), mask, "off")
    assert off.tolist() == [[1.0, 1.0]] * 3 and off_stats["capped"].item() == 0
    with pytest.raises(ValueError, match="token, seq_mask or off"):
        grpo.importance_weights(old, old, mask, "tis")


def test_policy_loss_scales_each_token_by_its_detached_weight():
    lp = torch.zeros(1, 2, requires_grad=True)
    weights = torch.tensor([[0.5, 2.0]], requires_grad=True)
    loss, _ = grpo.policy_loss(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2), weights=weights)
    assert loss.tolist() == [[-0.5, -2.0]]  # −w·ratio·A at ratio 1
    loss.sum().backward()
    assert lp.grad.tolist() == [[-0.5, -2.0]] and weights.grad is None  # the weights carry no gradient


def test_dr_grpo_aggregation_divides_by_a_constant():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # (1 + 2 + 4) / (2 sequences × max_tokens 8), whatever the lengths
    denominator = grpo.loss_denominator("token_sum_norm", tokens=3, seqs=2, max_tokens=8)
    assert denominator == 16
    assert grpo.aggregate(loss, mask, "token_sum_norm", denominator).item() == pytest.approx(7 / 16)
    assert grpo.loss_denominator("token_mean", 3, 2, 8) == 3 and grpo.loss_denominator("seq_mean", 3, 2, 8) == 2


@pytest.mark.parametrize("length,expected", [(0, 0.0), (96, 0.0), (97, -1 / 32), (112, -0.5), (128, -1.0),
                                             (140, -1.0)])
def test_overlong_penalty_by_hand(length, expected):
    # max_tokens 128, buffer 32: free up to 96 tokens, then −1/32 per token
    assert grpo.overlong_penalty(length, 128, 32) == pytest.approx(expected)


@pytest.mark.parametrize("step,schedule,expected", [
    (0, "cosine", 0.5), (1, "cosine", 1.0), (2, "cosine", 1.0), (6, "cosine", 0.5), (10, "cosine", 0.0),
    (6, "linear", 0.5), (10, "linear", 0.0), (6, "constant", 1.0),
])
def test_lr_multiplier(step, schedule, expected):
    assert lr_multiplier(step, total=10, warmup=2, schedule=schedule, min_ratio=0.0) == pytest.approx(expected)


def test_lr_multiplier_min_ratio():
    assert lr_multiplier(10, 10, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(5, 10, 0, "linear", 0.2) == pytest.approx(0.6)


def _sample(p, c, adv=1.0):
    return TrainSample(list(range(p)), list(range(c)), [0.0] * c, adv)


def test_make_shards_balances_and_counts():
    samples = [_sample(4, 10), _sample(4, 2), _sample(4, 2), _sample(4, 2), _sample(4, 8)]
    shards = make_shards(samples, world_size=2, micro_batch_size=2, minibatches=1, temperature=0.7)
    assert len(shards) == 2
    assert sorted(len(s.minibatches[0]) for s in shards) == [2, 3]
    assert all(s.global_tokens == [24] and s.global_seqs == [5] and s.micro_batches == [2] for s in shards)
    loads = sorted(sum(x.num_tokens for x in s.minibatches[0]) for s in shards)
    assert loads == [20, 24]  # sizes 14, 6, 6, 6, 12: {14, 6} vs {12, 6, 6} is the best split
    assert shards[0].temperature == 0.7


def test_make_shards_minibatches_and_empty_ranks():
    samples = [_sample(2, 3) for _ in range(3)]
    shards = make_shards(samples, world_size=4, micro_batch_size=8, minibatches=2, temperature=1.0)
    assert [len(s.minibatches) for s in shards] == [2, 2, 2, 2]
    assert shards[0].global_seqs == [2, 1] and shards[0].global_tokens == [6, 3]
    assert sum(len(s.minibatches[1]) for s in shards) == 1  # three ranks get an empty minibatch
    assert shards[0].micro_batches == [1, 1]
    with pytest.raises(ValueError):
        make_shards([], 1, 1, 1, 1.0)


def test_make_shards_never_makes_an_empty_minibatch():
    samples = [_sample(2, 3) for _ in range(9)]
    shards = make_shards(samples, world_size=2, micro_batch_size=4, minibatches=4, temperature=1.0)
    assert shards[0].global_seqs == [3, 3, 3]  # 4 asked, 3 non-empty ones: no optimizer step on zero gradients


def test_reduce_metrics_weights_by_tokens():
    base = dict(seqs=1, loss=0.0, kl_sum=0.0, ratio_max=1.0, ratio_min=1.0, grad_norm=0.5,
                lr=1e-6, steps=1, skipped_steps=0, nonfinite_microbatches=0, train_seconds=1.0,
                peak_memory_bytes=2**30)
    a = dict(base, tokens=10, clipped_tokens=1, ratio_sum=10.0, entropy_sum=20.0, loss=0.25, mismatch_sum=0.5,
             mismatch_tokens=10, mismatch_kl_sum=0.002, is_capped_tokens=1)
    b = dict(base, peak_memory_bytes=3 * 2**29, tokens=30, clipped_tokens=3, ratio_sum=33.0, entropy_sum=30.0,
             loss=0.5, ratio_max=1.3, mismatch_sum=0.7, mismatch_tokens=20, mismatch_kl_sum=0.006,
             is_capped_tokens=0)  # 10 of its tokens had no pre-update logprob
    m = reduce_metrics([RankSums(**a), RankSums(**b)])
    assert m.clip_frac == pytest.approx(0.1)
    assert m.ratio_mean == pytest.approx(43 / 40)
    assert m.entropy == pytest.approx(50 / 40)
    assert m.loss == pytest.approx(0.75)
    assert m.ratio_max == 1.3
    assert m.logprob_mismatch == pytest.approx(1.2 / 30)
    assert m.mismatch_kl == pytest.approx(0.008 / 40) and m.is_capped_frac == pytest.approx(1 / 40)
    assert m.learner_peak_gib == 1.5  # the largest rank's
