"""learner.layout: a group's prompt computed once gives the same numbers as a row per sample.

A hand-checked small case of the rows, then the learner's own logprob path (`LearnerWorker._collate` and
`_completion_logprobs`, without DeepSpeed) on random Qwen2 and Llama models, every layout against padded: logprobs,
entropies, the GRPO loss and every parameter's gradient, for several groups of different prompt and completion
lengths. DeepSpeed ZeRO-2/3 with the default layout is checked against plain torch in tests/test_learner.py.
"""
import pytest
import torch

from core.types import TrainSample
from learner import grpo, layout
from learner.shards import make_shards, prompt_pieces
from learner.worker import LearnerWorker
from reference import make_groups as groups


def test_shared_rows_by_hand():
    a, b, c = TrainSample([7, 8], [1, 2], [0.0] * 2, 1.0), TrainSample([9], [3], [0.0], 1.0), \
        TrainSample([7, 8], [4], [0.0], 1.0)
    got = layout.rows([a, b, c], "shared", pad_id=0)
    assert got["input_ids"].tolist() == [[7, 8, 1, 2, 4], [9, 3, 0, 0, 0]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert got["targets"].tolist() == [[1, 2], [3, 0], [4, 0]]
    # a's tokens are predicted from row 0 columns 1 (the prompt's end) and 2; c's first from column 1 too
    assert got["predictors"][:, 0].tolist() == [1, 5, 1] and got["predictors"][0, 1] == 2
    allowed = got["attention_mask"][0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # c's token sees the prompt and itself, not a's completion
    packed = layout.rows([a, b, c], "packed", pad_id=0)
    assert packed["input_ids"].tolist() == [[7, 8, 1, 2, 4, 9, 3]]
    assert packed["predictors"][:, 0].tolist() == [1, 5, 1]
    assert not packed["attention_mask"][0, 0, 5:, :5].any()  # the second prompt's row is its own
    padded = layout.rows([a, b, c], "padded", pad_id=0)
    assert padded["input_ids"].tolist() == [[7, 8, 1, 2], [0, 9, 3, 0], [7, 8, 4, 0]]
    assert padded["predictors"].tolist() == [[1, 2], [5, 6], [9, 10]]


def test_choose_falls_back_where_attention_takes_no_mask():
    assert layout.choose("auto", "cpu", "sdpa") == (layout.AUTO["cpu"], "")
    used, why = layout.choose("shared", "cuda", "flash_attention_2")
    assert used == "padded" and "flash_attention_2" in why
    with pytest.raises(ValueError, match="learner.layout"):
        layout.rows(groups(), "folded", 0)


def test_shards_keep_a_prompt_s_samples_together():
    samples = groups()
    pieces = prompt_pieces(samples, 2)
    assert [len(p) for p in pieces] == [2, 1, 2, 2, 1]  # prompt 0: 3 → 2 + 1; prompt 2: 4 → 2 + 2; prompt 1: 1
    assert all(len({tuple(s.prompt_ids) for s in p}) == 1 for p in pieces)
    for shard in make_shards(samples, world_size=2, micro_batch_size=2, minibatches=1, temperature=1.0):
        for piece in prompt_pieces(shard.minibatches[0], 2):
            assert any(all(s in p for s in piece) for p in pieces)  # no piece was cut across ranks


def tiny(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, attn_implementation="sdpa")
    cls, config = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "llama": (LlamaForCausalLM, LlamaConfig)}[family]
    return cls(config(**kw)).float()


def forward_backward(model, samples, which: str, attention: str = "sdpa") -> dict:
    worker = LearnerWorker.__new__(LearnerWorker)  # its batch and logprob code alone, without DeepSpeed
    worker.pad_id, worker.device, worker.chunk = 0, "cpu", 7  # several logprob chunks
    worker.layout, worker.attention = which, attention
    batch = worker._collate(samples)
    model.zero_grad()
    lp, ent = worker._completion_logprobs(model, batch, temperature=0.8, with_entropy=True)
    tok_loss, _ = grpo.policy_loss(lp, batch["vllm_lp"], batch["adv"], batch["mask"])
    loss = grpo.aggregate(tok_loss, batch["mask"], "token_mean", float(batch["mask"].sum()))
    loss.backward()
    m = batch["mask"].bool()
    return {"lp": lp.detach()[m], "entropy": ent[m], "loss": loss.detach(), "rows": batch["input_ids"].numel(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("which,attention", [("shared", "sdpa"), ("packed", "sdpa"), ("shared", "eager")])
def test_each_prompt_once_gives_padded_numbers(family, which, attention):
    model = tiny(family)
    if attention == "eager":
        model.config._attn_implementation = "eager"
    samples = groups()
    want, got = forward_backward(model, samples, "padded", attention), forward_backward(model, samples, which, attention)
    assert got["rows"] < want["rows"]  # fewer positions computed
    torch.testing.assert_close(got["lp"], want["lp"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["entropy"], want["entropy"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=0)
    assert set(got["grads"]) == set(want["grads"])
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
