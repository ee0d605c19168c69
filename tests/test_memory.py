"""learner/memory.py: the learner memory arithmetic, hand-checked, and the GPU presets sized by it."""
from __future__ import annotations

import pytest

from launch.config import load_config
from learner import memory

# Qwen2.5-0.5B's config.json (the fields the estimate reads).
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
GPU_BYTES = 80e9  # one 80 GB learner GPU (H100 80 GB)
BUDGET = 0.6 * GPU_BYTES  # the rest: CUDA context, NCCL buffers, the allocator's fragmentation

# hidden 8, intermediate 16, 2 layers, 2 heads × head_dim 4 (q 8), 1 kv head (kv 4), vocab 32, tied, q/k/v biases
TINY = dict(model_type="qwen2", vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
# embedding 32·8 = 256; per layer q 8·8+8 = 72, k 8·4+4 = 36, v 36, o 8·8 = 64, MLP 3·8·16 = 384, 2 norms 16
# → 608, × 2 layers = 1216; final norm 8. 256 + 1216 + 8 = 1480.
TINY_PARAMS = 1480


def test_param_counts():
    assert memory.model_dims(TINY)["params"] == TINY_PARAMS
    # 151936·896 = 136134656 (tied); per layer 896·896+896 + 2·(896·128+128) + 896·896 + 3·896·4864 + 2·896
    # = 14912384, × 24 = 357897216; + 896: 494032768, the "494M" of the model card
    assert memory.model_dims(QWEN25_05B)["params"] == 494_032_768
    untied = memory.model_dims({**TINY, "tie_word_embeddings": False})["params"]
    assert untied == TINY_PARAMS + 32 * 8
    llama = memory.model_dims({**TINY, "model_type": "llama"})["params"]
    assert llama == TINY_PARAMS - 2 * (8 + 4 + 4)  # no q/k/v biases


def test_tiny_estimate_by_hand():
    est = memory.from_hf_config(TINY, micro_batch=3, seq_len=10, zero_stage=2, ranks=1, reduce_bucket=100)
    # ZeRO-2, 1 rank: 1480 × (4 params + 4 master + 4 grads + 8 Adam) = 29600
    assert (est["params"], est["master"], est["grads"], est["optimizer"]) == (5920, 5920, 5920, 11840)
    assert est["model_states"] == 29600
    # per token per layer: norms 16·8 + 8 = 136, bf16 casts 10·8 = 80, attention 8·8 + 4·2 = 72, mask 2·10 = 20,
    # MLP 8·16 = 128 → 436
    assert est["activations_per_token_layer"] == 436
    # 30 tokens × 2 layers × 436 = 26160, + 30 × (12·8 + 4) = 3000 → 29160
    assert est["activations"] == 29160
    # head: min(2^25 // 32, 30) = 30 positions × 32 × 14 B = 13440, + 12 × 32 × 8 = 3072; bucket 4 × 100;
    # bf16 weight copies 2 × 1480 = 2960
    assert (est["head"], est["buckets"], est["weight_copies"]) == (16512, 400, 2960)
    assert est["total"] == 29600 + 400 + 2960 + 29160 + 16512 == 78632
    # stage 0 (no master copy, no bucket): 1480 × 16 = 23680
    assert memory.from_hf_config(TINY, 3, 10, zero_stage=0, ranks=1)["model_states"] == 23680


def test_zero_sharding():
    one = memory.from_hf_config(TINY, 1, 10, zero_stage=2, ranks=1)
    two = memory.from_hf_config(TINY, 1, 10, zero_stage=2, ranks=2)
    assert two["params"] == one["params"]  # ZeRO-2 keeps a full copy of the parameters on every rank
    for key in ("master", "grads", "optimizer"):
        assert two[key] * 2 == one[key]
    assert two["model_states"] == 5920 + (5920 + 5920 + 11840) // 2
    assert two["activations"] == one["activations"]
    stage1 = memory.model_states(TINY_PARAMS, zero_stage=1, ranks=2)
    assert stage1["grads"] == 5920 and stage1["optimizer"] == 5920  # stage 1 shards only the optimizer states
    stage3 = memory.model_states(TINY_PARAMS, zero_stage=3, ranks=2)
    assert stage3 == dict(params=2960, master=0, grads=2960, optimizer=5920, model_states=11840)


def test_checkpointing_reduces_activations():
    for config, batch, seq in ((TINY, 3, 10), (QWEN25_05B, 16, 768)):
        full = memory.from_hf_config(config, batch, seq, checkpointing=False)
        ckpt = memory.from_hf_config(config, batch, seq, checkpointing=True)
        assert ckpt["activations"] < full["activations"]
        assert ckpt["model_states"] == full["model_states"] and ckpt["head"] == full["head"]
    # Qwen2.5-0.5B, 16 × 768 tokens: 21.1 GB of activations without, 2.1 GB with
    assert round(memory.gb(full["activations"]), 1) == 21.1 and round(memory.gb(ckpt["activations"]), 1) == 2.1


def test_chunk_matches_the_learner():
    from learner import grpo  # imports torch

    assert memory.chunk_positions(151936) == grpo.chunk_positions(151936) == 220
    assert memory.chunk_positions(32) == grpo.chunk_positions(32)


def test_layer_count_is_what_autograd_saves():
    """The per-token list of `layer_bytes_per_token`, against the tensors a tiny Qwen2 actually saves for backward
    (one layer more minus one layer less, weights and their casts left out), under CPU bf16 autocast and fp32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    batch, seq = 2, 48

    def saved_bytes(layers: int, masked: bool, autocast: bool) -> int:
        cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=352,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg).float()
        weight_shapes = {tuple(p.shape) for p in model.parameters()}
        weight_shapes |= {s[::-1] for s in weight_shapes}
        ids = torch.randint(0, 512, (batch, seq))
        attention = torch.ones(batch, seq, dtype=torch.long)
        if masked:
            attention[0, :5] = 0  # a left-padded row: transformers then passes SDPA a mask
        storages: dict[int, int] = {}

        def pack(t):
            if tuple(t.shape) not in weight_shapes:
                storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.model(input_ids=ids, attention_mask=attention)
        return sum(storages.values())

    for masked in (True, False):
        for autocast in (True, False):
            measured = (saved_bytes(3, masked, autocast) - saved_bytes(2, masked, autocast)) / (batch * seq)
            expected = memory.layer_bytes_per_token(128, 352, 4, 2, 32, seq, autocast, masked)
            assert measured == expected, (masked, autocast)


# (preset, whether its micro-batch must be the largest power of two up to 16 that fits)
PRESETS = [("gsm8k_qwen2.5_0.5b.yaml", True), ("math_qwen2.5_0.5b.yaml", True),
           ("gsm8k_qwen2.5_0.5b_multinode.yaml", False), ("gsm8k_python_qwen2.5_0.5b.yaml", True)]


@pytest.mark.parametrize("preset, largest", PRESETS)
def test_gpu_preset_fits_without_checkpointing(preset, largest):
    cfg = load_config(preset)  # resolved as the job resolves it: inherit, then the preset's own fields
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B" and cfg.model.dtype == "bfloat16"  # QWEN25_05B, bf16 autocast
    seq = cfg.max_model_len  # the worst row: the engines' window (longest prompt + completion, or every turn)
    learner = cfg.learner

    def total(batch: int, checkpointing: bool = False) -> float:
        return memory.from_hf_config(QWEN25_05B, batch, seq, learner.zero_stage, learner.num_workers,
                                     checkpointing)["total"]

    assert total(learner.micro_batch_size) <= BUDGET, (
        f"{preset}: micro_batch_size {learner.micro_batch_size} at {seq} tokens needs "
        f"{memory.gb(total(learner.micro_batch_size)):.1f} GB without checkpointing, over 60% of 80 GB")
    # It fits, so recomputing every layer in backward buys nothing.
    assert learner.gradient_checkpointing is False, f"{preset}: fits without gradient checkpointing; turn it off"
    if largest:
        best = max(b for b in (1, 2, 4, 8, 16) if total(b) <= BUDGET)
        assert learner.micro_batch_size == best, f"{preset}: {best} sequences per micro-batch fit"


def test_preset_numbers_in_the_comments():
    """The figures written in configs/gsm8k_qwen2.5_0.5b.yaml and math_qwen2.5_0.5b.yaml."""
    gsm8k = memory.from_hf_config(QWEN25_05B, 16, 256 + 512, 2, 1, False)
    fixed = gsm8k["model_states"] + gsm8k["buckets"] + gsm8k["weight_copies"] + gsm8k["head"]
    rounded = lambda n: round(memory.gb(n), 2)  # noqa: E731
    assert (rounded(gsm8k["model_states"]), rounded(gsm8k["buckets"]), rounded(gsm8k["weight_copies"]),
            rounded(gsm8k["head"]), round(memory.gb(fixed), 1)) == (9.88, 2.0, 0.99, 2.1, 15.0)
    assert gsm8k["activations_per_token_layer"] == 70976 and gsm8k["chunk_positions"] == 220
    assert (round(memory.gb(gsm8k["activations"]), 1), round(memory.gb(gsm8k["total"]), 1)) == (21.1, 36.0)
    assert round(memory.gb(memory.from_hf_config(QWEN25_05B, 32, 768)["total"]), 1) == 57.1
    math = memory.from_hf_config(QWEN25_05B, 8, 512 + 1024, 2, 1, False)
    assert math["activations_per_token_layer"] == 72512
    assert (round(memory.gb(math["activations"]), 1), round(memory.gb(math["total"]), 1)) == (21.5, 36.5)
    assert round(memory.gb(memory.from_hf_config(QWEN25_05B, 16, 1536)["total"]), 1) == 58.0
