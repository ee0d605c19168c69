"""Learner GPU memory, estimated by arithmetic: what one rank holds at its peak (the start of backward).

Pure Python, no torch: the GPU presets size `learner.micro_batch_size` and `learner.gradient_checkpointing` with
it (their comments show the numbers) and `tests/test_memory.py` checks the presets against it. It models the
learner as `learner/worker.py` builds it: a Qwen2/Llama decoder in fp32 parameters under bf16 autocast
(DeepSpeed `torch_autocast`), AdamW, ZeRO stage 0-3, logprobs from the head a chunk of positions at a time
(`grpo.chunked_logprobs`). Not counted: the CUDA context, NCCL buffers, the allocator's fragmentation (keep a
margin, e.g. size for 60% of the card), DeepSpeed's ZeRO-3 gather/prefetch buffers and a reference model
(grpo.beta > 0).

Every number is in bytes; `gb()` turns one into decimal GB.
"""
from __future__ import annotations

GB = 1e9
DEFAULT_CHUNK_ELEMENTS = 1 << 25  # grpo.chunk_positions' default: 128 MiB of fp32 logits per chunk
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)


def gb(n: float) -> float:
    return n / GB


def chunk_positions(vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """The same as `learner.grpo.chunk_positions` (which needs torch to import): positions per logits chunk."""
    return max(1, chunk_elements // vocab)


def _shard(n: int, ranks: int) -> int:
    return -(-n // ranks)


def model_states(params: int, zero_stage: int, ranks: int) -> dict:
    """Bytes per rank of parameters, DeepSpeed's fp32 master copy, gradients and Adam's m and v.

    The model's parameters are fp32 (autocast keeps them so): 4 B each, gradients 4 B, Adam m and v 8 B.
    ZeRO stage 1 shards the optimizer states over the ranks, stage 2 also the gradients, stage 3 also the
    parameters (DeepSpeed's definitions). Stages 1 and 2 also keep a fp32 master partition cloned from the
    parameters even when these are fp32 already (deepspeed/runtime/zero/stage_1_and_2.py, `weights_partition =
    ...clone()`), 4 B per parameter sharded like the optimizer; stage 3 under autocast reuses the fp32 partition
    and stage 0 steps the parameters themselves, so neither has one.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    out = {
        "params": 4 * (_shard(params, ranks) if zero_stage >= 3 else params),
        "master": 4 * _shard(params, ranks) if zero_stage in (1, 2) else 0,
        "grads": 4 * (_shard(params, ranks) if zero_stage >= 2 else params),
        "optimizer": 8 * (_shard(params, ranks) if zero_stage >= 1 else params),
    }
    out["model_states"] = sum(out.values())
    return out


def layer_bytes_per_token(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                          seq_len: int, autocast_bf16: bool = True, masked: bool = True) -> int:
    """Bytes that one Qwen2/Llama decoder layer saves for backward, per token (HF transformers, SDPA attention).

    With bf16 autocast (h = hidden, I = intermediate, q = heads × head_dim, kv = kv_heads × head_dim, s = seq_len):

      fp32 residual stream and RMSNorm tensors (4 B each):
        layer input x (the residual; RMSNorm's pow saves it)       h
        input_layernorm's normalised x (for its weight's grad)     h
        residual after attention (post_attention_layernorm input)  h
        post_attention_layernorm's normalised x                    h      → 16 h bytes
        the two norms' rsqrt, one value per token each                    → 8 bytes
      bf16 casts of the norm outputs that the autocast matmuls save (2 B; autocast caches only casts of leaf
      weights, so each projection casts its input anew):
        q_proj, k_proj, v_proj inputs                            3 h
        gate_proj, up_proj inputs                                2 h      → 10 h bytes
      attention (bf16): SDPA saves q, k, v and its output; the output is laid out [B, s, heads, head_dim], so
        the reshape for o_proj is a view and o_proj's saved input is the same tensor. With a padding mask (every
        padded micro-batch: left-padded prompts, right-padded completions) transformers repeats k and v to all
        heads (`use_gqa_in_sdpa` is false with a mask), so k and v are q wide:
        masked: q + q + q + q = 4 q                                        → 8 q bytes
        unmasked (native GQA): q + kv + kv + q                             → 2 (2 q + 2 kv) bytes
        SDPA's logsumexp, fp32 per head                                    → 4 heads bytes
        the additive bf16 mask [B, 1, s, s] SDPA makes from the boolean one, in every layer: s per token
                                                                           → 2 s bytes (masked only)
      MLP (bf16): gate_proj output (SiLU's input), SiLU output, up_proj output (the product's two inputs), their
        product (down_proj's input)                                    4 I → 8 I bytes
      RoPE saves only cos/sin (shared by all layers, not per layer); residual adds save nothing.

      Qwen2.5-0.5B (h 896, I 4864, 14 heads × 64, masked): 14336 + 8 + 8960 + 7168 + 56 + 38912 = 69440 B per
      token per layer, plus 2 s (1536 B at s = 768).

    This list is what `torch.autograd.graph.saved_tensors_hooks` reports for a tiny Qwen2 layer under CPU bf16
    autocast (transformers 5, torch 2.13), byte for byte, masked and not, with and without autocast.
    Without autocast (fp32 everywhere) every tensor is 4 B and the projections share their fp32 input: the same
    list with 4 B for the attention and MLP tensors and one q/k/v input and one gate/up input (8 h bytes).
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    low = 2 if autocast_bf16 else 4  # bytes of the tensors autocast matmuls save
    norms = 4 * 4 * hidden + 2 * 4
    casts = low * (5 if autocast_bf16 else 2) * hidden
    attn = low * (4 * q if masked else 2 * q + 2 * kv) + 4 * heads
    mask = low * seq_len if masked else 0
    mlp = low * 4 * intermediate
    return norms + casts + attn + mask + mlp


def estimate(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, params: int,
             micro_batch: int, seq_len: int, zero_stage: int, ranks: int, checkpointing: bool,
             autocast_bf16: bool = True, *, head_dim: int | None = None, masked: bool = True,
             chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, reduce_bucket: int = DEFAULT_REDUCE_BUCKET) -> dict:
    """Peak bytes of one learner rank for a micro-batch of `micro_batch` sequences of `seq_len` tokens.

    total = model_states + buckets + weight_copies + activations + head, where

      model_states   `model_states()`: params, master, grads, optimizer (per rank, ZeRO-sharded)
      buckets        DeepSpeed's contiguous gradient-reduction buffer for stages 1-3: reduce_bucket elements in
                     fp32 (allocated at full size whatever the model's size; one buffer, overlap_comm being off
                     for stage 2 by default)
      weight_copies  the bf16 casts of the weights that autocast makes in forward and autograd keeps for
                     backward: 2 B × params (0 without autocast)
      activations    tokens = micro_batch × seq_len (worst case: the collate pads every row to the longest prompt
                     plus the longest completion);
                     without checkpointing: tokens × layers × `layer_bytes_per_token` + tokens × (12 h + 4) (the
                     final norm's input, normalised x and rsqrt, fp32, and the fp32 copy of the head's input that
                     the chunks keep);
                     with checkpointing: tokens × layers × 4 h (each layer's fp32 input) + tokens × one layer's
                     full bytes (the layer recomputed in backward) + the same tokens × (12 h + 4)
      head           the chunked logprobs' working set: min(chunk_positions(vocab), tokens) positions × vocab
                     logits (`grpo.chunked_logprobs`, used by the worker's `_completion_logprobs`, makes one chunk
                     at a time in forward and recomputes one at a time in backward): bf16 logits 2 B +
                     fp32 z = logits / T 4 B + two fp32 temporaries 8 B (logsumexp's exp or entropy's softmax in
                     forward; softmax and dz in the chunk's recomputed backward) = 14 B per logit (16 B without
                     autocast); plus the output weight's gradient while the chunks run: bf16 recast of the weight
                     2 B + its bf16 grad 2 B + that grad in fp32 4 B + the fp32 gradient accumulated over the
                     chunks (and the tied embedding) 4 B = 12 B × vocab × hidden (8 B without autocast: the
                     fp32 grad and the accumulated one)
    """
    head_dim = head_dim or hidden // heads
    tokens = micro_batch * seq_len
    states = model_states(params, zero_stage, ranks)
    per_layer = layer_bytes_per_token(hidden, intermediate, heads, kv_heads, head_dim, seq_len, autocast_bf16,
                                      masked)
    outside = (12 * hidden + 4) * tokens
    if checkpointing:
        activations = tokens * layers * 4 * hidden + tokens * per_layer + outside
    else:
        activations = tokens * layers * per_layer + outside
    chunk = chunk_positions(vocab, chunk_elements)
    head_logits = min(chunk, tokens) * vocab * (14 if autocast_bf16 else 16)  # one chunk, or all when fewer
    head_weight_grad = 12 * vocab * hidden if autocast_bf16 else 8 * vocab * hidden
    buckets = 4 * reduce_bucket if zero_stage >= 1 else 0
    weight_copies = 2 * params if autocast_bf16 else 0
    out = dict(states)
    out.update(
        buckets=buckets,
        weight_copies=weight_copies,
        activations=activations,
        activations_per_token_layer=per_layer,
        head=head_logits + head_weight_grad,
        head_logits=head_logits,
        head_weight_grad=head_weight_grad,
        chunk_positions=chunk,
        tokens=tokens,
        num_params=params,
    )
    out["total"] = states["model_states"] + buckets + weight_copies + activations + out["head"]
    return out


def param_count(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, *,
                head_dim: int | None = None, tied: bool = True, qkv_bias: bool = True, o_bias: bool = False,
                mlp_bias: bool = False) -> int:
    """Parameters of a Qwen2/Llama decoder: embedding, (untied) head, per layer q/k/v/o, gate/up/down and two
    RMSNorm weights, and the final norm. Qwen2 has q/k/v biases and none on o_proj or the MLP."""
    head_dim = head_dim or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * q + 2 * hidden * kv + q * hidden
    attn += (q + 2 * kv) * qkv_bias + hidden * o_bias
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden) * mlp_bias
    per_layer = attn + mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def model_dims(config: dict) -> dict:
    """estimate()'s model arguments (and head_dim) from a Hugging Face config dict (config.json)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    dims = dict(hidden=hidden, intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
                heads=heads, kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"])
    head_dim = config.get("head_dim") or hidden // heads
    attention_bias = bool(config.get("attention_bias", False))  # Llama: on q/k/v and o
    qkv_bias = attention_bias or config.get("model_type", "qwen2") == "qwen2"  # Qwen2: q/k/v always
    # Qwen2Config and LlamaConfig default to untied embeddings (Qwen2.5-0.5B's config.json sets true).
    dims["params"] = param_count(**dims, head_dim=head_dim, tied=bool(config.get("tie_word_embeddings", False)),
                                 qkv_bias=qkv_bias, o_bias=attention_bias, mlp_bias=bool(config.get("mlp_bias")))
    dims["head_dim"] = head_dim
    return dims


def from_hf_config(config: dict, micro_batch: int, seq_len: int, zero_stage: int = 2, ranks: int = 1,
                   checkpointing: bool = False, autocast_bf16: bool = True, **kwargs) -> dict:
    """`estimate()` for the model a Hugging Face config dict describes."""
    dims = model_dims(config)
    head_dim = dims.pop("head_dim")
    return estimate(**dims, micro_batch=micro_batch, seq_len=seq_len, zero_stage=zero_stage, ranks=ranks,
                    checkpointing=checkpointing, autocast_bf16=autocast_bf16, head_dim=head_dim, **kwargs)


def summary(est: dict) -> str:
    """One line in GB: the terms of the total."""
    return (f"model states {gb(est['model_states']):.2f} GB (params {gb(est['params']):.2f}, master "
            f"{gb(est['master']):.2f}, grads {gb(est['grads']):.2f}, Adam {gb(est['optimizer']):.2f}) + buckets "
            f"{gb(est['buckets']):.2f} + bf16 weight copies {gb(est['weight_copies']):.2f} + activations "
            f"{gb(est['activations']):.2f} ({est['tokens']} tokens) + head {gb(est['head']):.2f} = total "
            f"{gb(est['total']):.2f} GB")
