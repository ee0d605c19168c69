"""One step's data, from prompts to the training batch: prompts drawn in data order, n samples each, rewards, GRPO
advantages, DAPO refill (`collect`), evaluation on every eval set (`evaluate`), and the numbers a step logs
(`step_row`). The loop in `launch.train` and the eval-only entry point `launch.evaluate` call these; they hold no
actors of their own. Nothing here knows the task: rewards and metrics come from a `rewards.Scorer` built from the
config (`make_scorer`)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from core.types import LearnerStats, Sample, TrainSample
from launch.config import Config, ConfigError, Fields
from launch.data import Example, PromptOrder, encode_prompts, load_examples, split_holdout
from learner.grpo import group_advantages, overlong_penalty
from rewards import Scorer


class Sampler(Protocol):
    """What rollouts and evaluation generate with: the weight channel (`launch.weights.WeightChannel`), or an
    `EngineGroup` alone when the engines keep the model's own weights."""

    def generate(self, prompts: list[list[int]], n: int, **sampling) -> list[list[Sample]]: ...


@dataclass
class PromptSet:
    examples: list[Example]
    ids: list[list[int]]
    name: str = ""  # eval sets: "" for data.test_split (logged as eval/...), else eval/<name>/...


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


def make_scorer(cfg: Config) -> Scorer:
    """The task's rewards and metrics (call `close()` when done: user rewards run in a process pool)."""
    t = cfg.task
    return Scorer(cfg.rewards, t.functions, t.accuracy, t.format, t.reward_workers, t.reward_timeout_s,
                  t.reward_max_failures)


def prompt_set(cfg: Config, tokenizer, source: str, split: str, fields, label: str, count: int | None = None,
               name: str = "", part: str | None = None) -> PromptSet:
    """The first `count` rows of a split that parse, as prompt token ids (those over data.max_prompt_tokens
    dropped); `part` "train" or "holdout" takes that part of the split (data.holdout). Errors of the data are the
    config's to fix (exit 2)."""
    try:
        examples = load_examples(split, source, fields, label=label)
        if part is not None:
            train, held = split_holdout(examples, cfg.data.holdout)
            examples = train if part == "train" else held
    except ValueError as err:  # no usable rows, a split the source lacks, a template naming an absent field
        raise ConfigError(f"{label}: {err}") from None
    examples, ids, _ = encode_prompts(examples[:count], cfg.data, tokenizer)
    if not ids:
        raise ConfigError(f"no {label} {split} prompt fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return PromptSet(examples, ids, name)


PROMPT_KEYS = ("prompt_field", "messages_field", "question_template")  # where a row's prompt comes from


def load_train(cfg: Config, tokenizer) -> PromptSet:
    d = cfg.data
    return prompt_set(cfg, tokenizer, d.source, d.train_split, d, cfg.task.name, part="train" if d.holdout else None)


def load_eval_sets(cfg: Config, tokenizer) -> list[PromptSet]:
    """data.test_split (or data.holdout's rows of train_split) first, logged as eval/..., then every eval.sets entry
    (eval/<name>/...)."""
    d = cfg.data
    split, part = (d.train_split, "holdout") if d.holdout else (d.test_split, None)
    sets = [prompt_set(cfg, tokenizer, d.source, split, d, cfg.task.name, cfg.eval.num_examples, part=part)]
    for e in cfg.eval.sets:
        fields = Fields(**{k: getattr(e, k) if getattr(e, k) is not None else getattr(d, k)
                           for k in Fields.model_fields})
        if any(getattr(e, k) is not None for k in PROMPT_KEYS):  # a set that says where its prompt is inherits
            for k in PROMPT_KEYS:                                 # none of data's other prompt keys
                if getattr(e, k) is None and k != "prompt_field":
                    setattr(fields, k, None)
        sets.append(prompt_set(cfg, tokenizer, e.source, e.split, fields, e.name,
                               e.num_examples or cfg.eval.num_examples, e.name))
    return sets


def load_prompts(cfg: Config, tokenizer) -> tuple[PromptSet, list[PromptSet]]:
    return load_train(cfg, tokenizer), load_eval_sets(cfg, tokenizer)


def score(groups: list[list[Sample]], examples: list[Example], scorer: Scorer, grpo=None,
          max_tokens: int = 0) -> tuple[torch.Tensor, dict]:
    """Rewards [prompts, n] and per-sample details (each reward, the task's accuracy and format). Prompts the
    engine dropped (past its window) get zero rewards here and are left out of the details and of the batch. With
    grpo.overlong == "penalty", DAPO's soft overlong penalty is added to each reward."""
    live = [(samples, ex) for samples, ex in zip(groups, examples) if samples[0].finish_reason != "dropped"]
    flat, totals, details = score_groups(scorer, [g for g, _ in live], [ex for _, ex in live])
    if grpo is not None and grpo.overlong == "penalty":
        details["overlong_penalty"] = [overlong_penalty(s.model_tokens, max_tokens, grpo.overlong_buffer)
                                       for s, _ in flat]
        totals = [t + p for t, p in zip(totals, details["overlong_penalty"])]
    if any(s.env for s, _ in flat):  # multi-turn: the environment's own reward is added; a failed one scores 0
        details["env_reward"] = [s.env.get("env_reward", 0.0) for s, _ in flat]
        totals = [0.0 if s.env.get("env_failed") else t + r for (s, _), t, r in zip(flat, totals, details["env_reward"])]
    it, out = iter(totals), []
    for samples in groups:
        live_group = samples[0].finish_reason != "dropped"
        out.append([next(it) if live_group else 0.0 for _ in samples])
    return torch.tensor(out, dtype=torch.float64), details


def score_groups(scorer: Scorer, groups: list[list[Sample]], examples: list[Example]) -> tuple[list, list, dict]:
    """Every sample of every group scored against its example: (the (sample, example) pairs in order, totals,
    details)."""
    flat = [(s, ex) for g, ex in zip(groups, examples) for s in g]
    totals, details = scorer.score_batch([s.text for s, _ in flat], [ex.gold for _, ex in flat],
                                         [ex.fields for _, ex in flat])
    return flat, totals, details


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
        batch += [TrainSample(s.prompt_ids, s.completion_ids, s.logprobs, float(x), s.weight_version, s.mask)
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
    overlapped: bool = False  # generated while the learner trained the step before (train.pipeline: one_step_off)


def env_args(cfg: Config, examples: list[Example]) -> dict:
    """What a generate needs for multi-turn trajectories (cfg.env names an environment): the environment's config
    and each prompt's dataset row; nothing for single-turn sampling."""
    return {"env": cfg.env, "rows": [ex.fields for ex in examples]} if cfg.env.name else {}


def collect(cfg: Config, sampler: Sampler, prompts: PromptSet, order: PromptOrder, scorer: Scorer) -> Rollout:
    """Draw prompts_per_step prompts, generate n samples each, score them, build the batch. With grpo.refill,
    draw as many further prompts as groups were filtered out, round after round, until the step keeps
    prompts_per_step groups or grpo.refill_max_prompts extra prompts were drawn (DAPO dynamic sampling)."""
    want, timer = cfg.train.prompts_per_step, StepTimer()
    cap = cfg.grpo.refill_max_prompts or 4 * want
    ids, groups, rewards, details, batch, filtered, draw = [], [], [], {}, [], 0, want
    while draw > 0:
        new = order.next(draw)
        with timer("generate"):
            got = sampler.generate([prompts.ids[i] for i in new], cfg.rollout.n, temperature=cfg.rollout.temperature,
                                   top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_tokens, stop=cfg.rollout.stop,
                                   **env_args(cfg, [prompts.examples[i] for i in new]))
        with timer("reward"):
            r, d = score(got, [prompts.examples[i] for i in new], scorer, cfg.grpo, cfg.rollout.max_tokens)
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


def evaluate(sampler: Sampler, sets: list[PromptSet], cfg: Config, scorer: Scorer) -> dict:
    """Every eval set: eval.n samples per question (greedy by default), scored with the task's rewards (the same
    functions as training); the numbers are `eval_numbers`'. Sampled evaluation is seeded (train.seed), so that it
    does not depend on what the engines sampled before."""
    out, sampled = {}, cfg.eval.temperature > 0
    for test in sets:
        groups = sampler.generate(test.ids, cfg.eval.n, temperature=cfg.eval.temperature,
                                  max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens, stop=cfg.rollout.stop,
                                  seed=cfg.train.seed if sampled else None, timeout_s=cfg.timeouts.eval_s,
                                  **env_args(cfg, test.examples))
        out.update(eval_numbers(groups, test.examples, scorer, f"eval/{test.name}/" if test.name else "eval/"))
    return out


def eval_numbers(groups: list[list[Sample]], examples: list[Example], scorer: Scorer, prefix: str) -> dict:
    """One eval set's numbers: accuracy (the mean over every sample), format_rate, reward (the weighted total),
    completion_len, n (questions); with k > 1 samples per question also pass@k (the mean of each question's best
    accuracy: for 0/1 scores, the share of questions with a correct sample), mean@k (= accuracy) and mixed@k (the share
of questions whose samples differ in accuracy: the groups that would carry a learning signal in training)."""
    k = len(groups[0])
    flat, totals, details = score_groups(scorer, groups, examples)
    acc = details["accuracy"]
    row = {"accuracy": sum(acc) / len(acc)}
    if "format_rate" in details:
        row["format_rate"] = sum(details["format_rate"]) / len(acc)
    row.update(reward=sum(totals) / len(totals),
               completion_len=sum(s.model_tokens for s, _ in flat) / len(flat), n=len(groups))
    row.update(env_numbers([s for s, _ in flat]))
    if k > 1:
        best = [max(acc[i * k:(i + 1) * k]) for i in range(len(groups))]
        mixed = [len(set(acc[i * k:(i + 1) * k])) > 1 for i in range(len(groups))]
        row.update({f"pass@{k}": sum(best) / len(best), f"mean@{k}": row["accuracy"],
                    f"mixed@{k}": sum(mixed) / len(mixed)})
    return {prefix + key: v for key, v in row.items()}


def env_numbers(samples: list[Sample]) -> dict:
    """Multi-turn numbers, per trajectory (`env/...`: the mean of each counter the loop and the environment report:
    turns, tool calls and errors, environment seconds and tokens, failures) and the model's share of the tokens;
    empty for single-turn samples."""
    if not any(s.env for s in samples):
        return {}
    keys = sorted({k for s in samples for k in s.env})
    row = {f"env/{k}": sum(float(s.env.get(k, 0.0)) for s in samples) / len(samples) for k in keys}
    model, total = sum(s.model_tokens for s in samples), sum(len(s.completion_ids) for s in samples)
    row["env/model_token_frac"] = model / max(total, 1)
    return row


def step_row(ro: Rollout, stats: LearnerStats | None, learner_version: int, refill: bool = False) -> dict:
    """The numbers a step logs about its rollout and its update (`stats`: None when every group was filtered)."""
    groups, rewards, version = ro.groups, ro.rewards, min(s.weight_version for g in ro.groups for s in g)
    live = torch.tensor([g[0].finish_reason != "dropped" for g in groups])
    flat = [s for g in groups for s in g if s.finish_reason != "dropped"]
    lengths = [s.model_tokens for s in flat] or [0]
    kept = rewards[live] if live.any() else torch.zeros(1, 1, dtype=rewards.dtype)
    row = {"reward": float(kept.mean()), "reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
           **{k: sum(v) / max(len(v), 1) for k, v in ro.details.items()},
           "completion_len": sum(lengths) / len(lengths), "completion_len_max": max(lengths),
           "truncated_frac": sum(s.finish_reason == "length" for s in flat) / max(len(flat), 1),
           "groups": len(groups), "groups_filtered": ro.filtered, "groups_kept": len(groups) - ro.filtered,
           "samples": len(flat),
           "dropped_prompts": sum(g[0].finish_reason == "dropped" for g in groups),
           "weight_version": version, **env_numbers(flat), **(asdict(stats) if stats else {})}
    row["staleness"] = int(version != learner_version)  # updates the oldest sample is behind the learner (≤ 1)
    gen_s = ro.parts.get("generate", 0.0)
    row["gen_tokens_per_s"] = sum(lengths) / gen_s if gen_s else 0.0
    if stats and stats.train_seconds:
        row["train_tokens_per_s"] = stats.train_tokens / stats.train_seconds
    if ro.overlapped:
        row["rollout_seconds"] = ro.parts.get("generate", 0.0) + ro.parts.get("reward", 0.0)
    if refill:
        row.update(refill_prompts=ro.refill_prompts, refill_capped=float(ro.refill_capped))
    return row


def check_versions(groups: list[list[Sample]], allowed: set[int]) -> None:
    """Every sample of a step comes from the weights the engines held when its rollout began or, after an engine
    was replaced mid-rollout, from the learner's current ones: never from a replacement's startup weights, and at
    most one update behind the learner (train.pipeline: one_step_off)."""
    stale = sorted({s.weight_version for g in groups for s in g} - allowed)
    if stale:
        raise RuntimeError(f"samples from weight version(s) {stale} in a step that expects {sorted(allowed)}")
