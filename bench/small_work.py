"""Small work, one run: our step ÷ a plain single-process GRPO loop on the same tiny model and the same work.

The work: builtin:tiny-qwen2 (hidden 128, 2 layers, vocabulary 512), 4 GSM8K prompts × 16 samples × ≤ 64 tokens
per step, the toy digits reward. Ours: the whole job (`launch.train.train`, one engine and one learner rank in Ray
actors, weights broadcast every step). The plain loop: one process, Hugging Face `generate` (sampling at
temperature 1), the same reward and advantages, one forward/backward with the same GRPO loss, AdamW. Each runs
`--steps` steps; the median over steps 3.. is compared (target ≤ 1.0). This is fixed overhead, the cost a CPU user
feels first; on large models vLLM's generation wins.

    .venv/bin/python bench/small_work.py [--steps 10]
"""
import argparse
import statistics
import tempfile
import time

import common
import torch

from core.models import resolve_model
from launch.config import load_config
from launch.data import encode_prompts, load_gsm8k
from launch.metrics import read_jsonl
from launch.train import train
from learner import grpo
from rewards.toy import digit_fraction_reward

PROMPTS, N, TOKENS = 4, 16, 64
ARGS = [f"train.prompts_per_step={PROMPTS}", f"rollout.n={N}", f"rollout.max_tokens={TOKENS}", "train.device=cpu",
        "eval.every=0", "ckpt.every=0", "ckpt.export_hf=false", "log.sample_every=0", "log.tensorboard=false",
        "grpo.filter_groups=false", "learner.micro_batch_size=64"]


def ours(steps: int, extra: list[str]) -> tuple[list[float], list[dict]]:
    with tempfile.TemporaryDirectory(prefix="bench-small-") as out:
        train(load_config("toy_tiny_cpu.yaml", ARGS + [f"train.steps={steps}", f"train.output_dir={out}", *extra]))
        rows = [r for r in read_jsonl(f"{out}/metrics.jsonl") if "reward" in r]
    return [r["time/step"] for r in rows], rows


def plain(steps: int) -> tuple[list[float], list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config("toy_tiny_cpu.yaml", ARGS)
    path = resolve_model(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, betas=cfg.learner.betas)
    _, prompt_ids, _ = encode_prompts(load_gsm8k("train", cfg.data.source), cfg.data, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    times, parts = [], []
    for step in range(steps):
        start = time.perf_counter()
        batch = [p for p in prompt_ids[step * PROMPTS:(step + 1) * PROMPTS] for _ in range(N)]
        P = max(map(len, batch))
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in batch])
        attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in batch])
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=TOKENS, pad_token_id=pad)
        gen = time.perf_counter() - start
        completion = out[:, P:]
        done = (completion == tok.eos_token_id).cumsum(-1)
        mask = ((done == 0) | ((done == 1) & (completion == tok.eos_token_id))).float()  # up to and with EOS
        texts = tok.batch_decode([c[m.bool()] for c, m in zip(completion, mask)], skip_special_tokens=True)
        rewards = torch.tensor([digit_fraction_reward(t, "") for t in texts], dtype=torch.float64).view(PROMPTS, N)
        adv = grpo.group_advantages(rewards).flatten().float()
        model.train()
        full_attn = torch.cat([attn, mask.long()], dim=1)
        logits = model(input_ids=out, attention_mask=full_attn, use_cache=False).logits[:, P - 1:-1]
        lp = grpo.token_logprobs(logits, completion, 1.0)
        loss, _ = grpo.policy_loss(lp, lp.detach(), adv, mask, cfg.grpo.clip_low, cfg.grpo.clip_high)
        grpo.aggregate(loss, mask, "token_mean", float(mask.sum())).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.max_grad_norm)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        parts.append({"generate": gen, "tokens": float(mask.sum())})
    return times, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    common.start_ray(num_cpus=4)
    plain_times, plain_parts = plain(args.steps)
    p = statistics.median(plain_times[2:])
    pg = statistics.median(x["generate"] for x in plain_parts[2:])
    ptok = statistics.median(x["tokens"] / x["generate"] for x in plain_parts[2:])
    print(f"plain loop (torch on {torch.get_num_threads()} threads): step {p:.3f}s (generate {pg:.3f}s, "
          f"{ptok:.0f} tok/s; update {p - pg:.3f}s)")
    # Sync: engine and learner take turns, so each may use both cores; one_step_off: one core each, side by side.
    for name, extra in (("ours, sync, 2 threads each", ["rollout.threads=2", "learner.threads=2"]),
                        ("ours, one_step_off, 1 thread each", ["train.pipeline=one_step_off"])):
        times, rows = ours(args.steps, extra)
        o = statistics.median(times[2:])
        og = statistics.median(r["time/generate"] for r in rows[2:])
        otr = statistics.median(r.get("time/train", 0.0) for r in rows[2:])
        otok = statistics.median(r["gen_tokens_per_s"] for r in rows[2:])
        print(f"{name}: step {o:.3f}s (generate {og:.3f}s waited for, {otok:.0f} tok/s; train {otr:.3f}s)")
        print(f"  ÷ plain loop: {o / p:.3f} (target ≤ 1.0)")


if __name__ == "__main__":
    main()
