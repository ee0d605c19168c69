"""What the job prints: one progress line and one line of numbers per step (readable in `ray job logs`, which has
no terminal), and now and then a sample."""
from __future__ import annotations

import time

from core.types import Sample
from launch.data import Example


class Progress:
    """A progress bar printed as one line per step: readable in `ray job logs`, which has no terminal."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()

    def line(self, step: int) -> str:
        from tqdm import tqdm

        return tqdm.format_meter(step, self.total, time.time() - self.t0, ncols=80, prefix="grpo", unit="step",
                                 initial=self.start)


def format_row(step: int, row: dict) -> str:
    t = row
    parts = [f"reward {t['reward']:.3f}", f"acc {t['accuracy']:.3f}"] + \
        ([f"fmt {t['format_rate']:.3f}"] if "format_rate" in t else []) + [f"len {t['completion_len']:.0f}"]
    if "loss" in t:
        parts += [f"loss {t['loss']:+.4f}", f"kl {t['kl']:.4f}", f"clip {t['clip_frac']:.3f}",
                  f"ent {t['entropy']:.2f}", f"gnorm {t['grad_norm']:.3f}", f"lr {t['lr']:.2e}",
                  f"|Δlp| {t['logprob_mismatch']:.1e}", f"mkl {t['mismatch_kl']:.1e}",
                  f"capped {t['is_capped_frac']:.3f}"]
    else:
        parts.append("no update (every group filtered)")
    if "refill_prompts" in t:
        parts.append(f"groups kept {t['groups_kept']}/{t['groups']}" + (" (refill cap)" if t["refill_capped"] else ""))
    if "eval/accuracy" in t:
        parts.append(f"EVAL acc {t['eval/accuracy']:.3f}" +
                     (f" fmt {t['eval/format_rate']:.3f}" if "eval/format_rate" in t else ""))
    failed = sum(v for k, v in t.items() if k.startswith("reward_failures/"))
    if failed:
        parts.append(f"reward failures {failed} so far")  # failed calls scored 0 (reward_failures/* per reward)
    if t.get("engine_restarts") or t.get("job_restarts"):
        parts.append(f"restarts: engines {t['engine_restarts']} job {t['job_restarts']}" +
                     (f" (recovered in {t['recover_seconds']:.0f}s this step)" if t.get("recover_seconds") else ""))
    times = " ".join(f"{k[5:]} {v:.1f}" for k, v in t.items() if k.startswith("time/") and k != "time/step")
    ahead = f", rollout {t['rollout_seconds']:.1f} overlapped" if "rollout_seconds" in t else ""
    parts.append(f"| {t['time/step']:.1f}s ({times}{ahead}) gen {t['gen_tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


def format_sample(example: Example, sample: Sample, reward_value: float) -> str:
    text = sample.transcript or sample.text  # multi-turn: the observations too
    text = text if len(text) < 1200 else text[:1200] + " …"
    question = example.question if isinstance(example.question, str) else example.question[-1]["content"]
    return (f"--- sample (reward {reward_value:.2f}, gold {example.gold}) ---\nQ: {question}\n"
            f"A: {text}\n---")
