"""One step's data, from prompts to the training batch: prompts drawn in data order, n samples each, rewards, GRPO
advantages, DAPO refill (`collect`), greedy evaluation, and the numbers a step logs (`step_row`). The loop in
`launch.train` calls these; they hold no actors of their own."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from core.types import Sample, TrainSample
from launch.config import Config, ConfigError
from launch.data import Example, PromptOrder, encode_prompts, load_gsm8k
from learner.grpo import group_advantages, overlong_penalty
from rewards import WeightedReward
from rewards.gsm8k import accuracy_reward, format_reward
from rollout.group import EngineGroup


@dataclass
class PromptSet:
    examples: list[Example]
    ids: list[list[int]]


class StepTimer:
    def __init__(self):
        self.start, self.parts = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    def report(self) -> dict:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.parts.items()}
        return {**out, "time/other": max(0.0, total - sum(self.parts.values())), "time/step": total}


def load_prompts(cfg: Config, tokenizer) -> tuple[PromptSet, PromptSet]:
    train_ex, train_ids, _ = encode_prompts(load_gsm8k("train", cfg.data.source), cfg.data, tokenizer)
    test_ex = load_gsm8k("test", cfg.data.source)[: cfg.eval.num_examples]
    test_ex, test_ids, _ = encode_prompts(test_ex, cfg.data, tokenizer)
    for split, ids in (("train", train_ids), ("test", test_ids)):
        if not ids:
            raise ConfigError(f"no GSM8K {split} prompt fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return PromptSet(train_ex, train_ids), PromptSet(test_ex, test_ids)


def score(groups: list[list[Sample]], golds: list[str], reward: WeightedReward, grpo=None,
          max_tokens: int = 0) -> tuple[torch.Tensor, dict]:
    """Rewards [prompts, n] and per-sample details (each reward, strict accuracy, format). Prompts the engine
    dropped (past its window) get zero rewards here and are left out of the details and of the batch. With
    grpo.overlong == "penalty", DAPO's soft overlong penalty is added to each reward."""
    penalty = grpo is not None and grpo.overlong == "penalty"
    totals, details = [], {"accuracy": [], "format_rate": [], **{f"reward/{k}": [] for k in reward.weights}}
    if penalty:
        details["overlong_penalty"] = []
    for samples, gold in zip(groups, golds):
        row = []
        if samples[0].finish_reason == "dropped":
            totals.append([0.0] * len(samples))
            continue
        for s in samples:
            total, parts = reward(s.text, gold)
            if penalty:
                details["overlong_penalty"].append(overlong_penalty(len(s.completion_ids), max_tokens,
                                                                    grpo.overlong_buffer))
                total += details["overlong_penalty"][-1]
            row.append(total)
            for k, v in parts.items():
                details[f"reward/{k}"].append(v)
            details["accuracy"].append(accuracy_reward(s.text, gold))
            details["format_rate"].append(format_reward(s.text))
        totals.append(row)
    return torch.tensor(totals, dtype=torch.float64), details


def build_batch(groups: list[list[Sample]], rewards: torch.Tensor, grpo) -> tuple[list[TrainSample], int]:
    """GRPO advantages per group; groups whose rewards are all equal carry no signal and are dropped if asked.
    With grpo.overlong == "mask", samples cut at max_tokens count in their group's advantages but are left out of
    the loss (DAPO overlong filtering)."""
    adv = group_advantages(rewards, scale=grpo.scale_rewards, eps=grpo.eps)
    batch, filtered = [], 0
    for samples, r, a in zip(groups, rewards, adv):
        if samples[0].finish_reason == "dropped" or (grpo.filter_groups and bool((r == r[0]).all())):
            filtered += 1
            continue
        batch += [TrainSample(s.prompt_ids, s.completion_ids, s.logprobs, float(x), s.weight_version)
                  for s, x in zip(samples, a)
                  if s.completion_ids and not (grpo.overlong == "mask" and s.finish_reason == "length")]
    return batch, filtered


@dataclass
class Rollout:
    """One step's data: every prompt drawn for it (in data order), its groups and rewards, the training batch, and
    the data order's state right after the draw (what a checkpoint of this step saves)."""

    batch_ids: list[int]
    groups: list[list[Sample]]
    rewards: torch.Tensor
    details: dict
    batch: list[TrainSample]
    filtered: int
    order_state: dict
    parts: dict  # seconds: generate, reward
    refill_prompts: int = 0  # prompts drawn beyond prompts_per_step
    refill_capped: bool = False  # grpo.refill_max_prompts reached before prompts_per_step groups were kept
    version: int = 0  # the weight version the engines held as the rollout began


def collect(cfg: Config, engines: EngineGroup, prompts: PromptSet, order: PromptOrder, reward: WeightedReward,
            sampling: dict) -> Rollout:
    """Draw prompts_per_step prompts, generate n samples each, score them, build the batch. With grpo.refill,
    draw as many further prompts as groups were filtered out, round after round, until the step keeps
    prompts_per_step groups or grpo.refill_max_prompts extra prompts were drawn (DAPO dynamic sampling)."""
    want, timer = cfg.train.prompts_per_step, StepTimer()
    cap = cfg.grpo.refill_max_prompts or 4 * want
    ids, groups, rewards, details, batch, filtered, draw = [], [], [], {}, [], 0, want
    while draw > 0:
        new = order.next(draw)
        with timer("generate"):
            got = engines.generate([prompts.ids[i] for i in new], cfg.rollout.n, **sampling)
        with timer("reward"):
            r, d = score(got, [prompts.examples[i].gold for i in new], reward, cfg.grpo, cfg.rollout.max_tokens)
            b, f = build_batch(got, r, cfg.grpo)
        ids, groups, batch, filtered = ids + new, groups + got, batch + b, filtered + f
        rewards.append(r)
        for k, v in d.items():
            details.setdefault(k, []).extend(v)
        kept = len(ids) - filtered
        draw = min(want - kept, cap - (len(ids) - want)) if cfg.grpo.refill else 0
    extra = len(ids) - want
    return Rollout(ids, groups, torch.cat(rewards), details, batch, filtered, order.state_dict(), timer.parts, extra,
                   cfg.grpo.refill and len(ids) - filtered < want)


def evaluate(engines: EngineGroup, test: PromptSet, cfg: Config) -> dict:
    """Greedy, one sample per question, strict tag rules (the same functions as the rewards)."""
    outs = engines.generate(test.ids, 1, temperature=0.0, max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens,
                            stop=cfg.rollout.stop, timeout_s=cfg.timeouts.eval_s)
    texts = [o[0].text for o in outs]
    acc = [accuracy_reward(t, ex.gold) for t, ex in zip(texts, test.examples)]
    fmt = [format_reward(t) for t in texts]
    return {"eval/accuracy": sum(acc) / len(acc), "eval/format_rate": sum(fmt) / len(fmt),
            "eval/completion_len": sum(len(o[0].completion_ids) for o in outs) / len(outs), "eval/n": len(acc)}


def step_row(groups, rewards, details, filtered, learner_stats, timer_parts, version, learner_version=None) -> dict:
    live = torch.tensor([g[0].finish_reason != "dropped" for g in groups])
    flat = [s for g in groups for s in g if s.finish_reason != "dropped"]
    lengths = [len(s.completion_ids) for s in flat] or [0]
    kept = rewards[live] if live.any() else torch.zeros(1, 1, dtype=rewards.dtype)
    row = {"reward": float(kept.mean()), "reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
           **{k: sum(v) / max(len(v), 1) for k, v in details.items()},
           "completion_len": sum(lengths) / len(lengths), "completion_len_max": max(lengths),
           "truncated_frac": sum(s.finish_reason == "length" for s in flat) / max(len(flat), 1),
           "groups": len(groups), "groups_filtered": filtered, "groups_kept": len(groups) - filtered,
           "samples": len(flat),
           "dropped_prompts": sum(g[0].finish_reason == "dropped" for g in groups),
           "weight_version": version, **learner_stats}
    if learner_version is not None:  # updates the oldest sample is behind the learner it trains (at most 1)
        row["staleness"] = int(version != learner_version)
    gen_s = timer_parts.get("generate", 0.0)
    row["gen_tokens_per_s"] = sum(lengths) / gen_s if gen_s else 0.0
    if learner_stats.get("train_seconds"):
        row["train_tokens_per_s"] = learner_stats["train_tokens"] / learner_stats["train_seconds"]
    return row


def check_versions(groups: list[list[Sample]], allowed: set[int]) -> None:
    """Every sample of a step comes from the weights the engines held when its rollout began or, after an engine
    was replaced mid-rollout, from the learner's current ones: never from a replacement's startup weights, and at
    most one update behind the learner (train.pipeline: one_step_off)."""
    stale = sorted({s.weight_version for g in groups for s in g} - allowed)
    if stale:
        raise RuntimeError(f"samples from weight version(s) {stale} in a step that expects {sorted(allowed)}")
