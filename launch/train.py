"""The GRPO training job: setup, then one loop that reads top to bottom (see `train`)."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from launch import checkpoint
from launch.cluster import WeightChannel, connect, detect_device, place
from launch.config import Config, ConfigError, dump_config
from launch.data import Example, PromptOrder, encode_prompts, load_gsm8k
from launch.metrics import MetricsLog, plot_curves, read_jsonl, summary
from core.models import resolve_model
from learner.grpo import group_advantages
from learner.group import LearnerGroup
from rewards import WeightedReward
from rewards.gsm8k import accuracy_reward, format_reward
from rollout.group import EngineGroup
from core.types import Sample, TrainSample

log = logging.getLogger("rlvr")


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
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t

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


def score(groups: list[list[Sample]], golds: list[str], reward: WeightedReward) -> tuple[torch.Tensor, dict]:
    """Rewards [prompts, n] and per-sample details (each reward, strict accuracy, format). Prompts the engine
    dropped (past its window) get zero rewards here and are left out of the details and of the batch."""
    totals, details = [], {"accuracy": [], "format_rate": [], **{f"reward/{k}": [] for k in reward.weights}}
    for samples, gold in zip(groups, golds):
        row = []
        if samples[0].finish_reason == "dropped":
            totals.append([0.0] * len(samples))
            continue
        for s in samples:
            total, parts = reward(s.text, gold)
            row.append(total)
            for k, v in parts.items():
                details[f"reward/{k}"].append(v)
            details["accuracy"].append(accuracy_reward(s.text, gold))
            details["format_rate"].append(format_reward(s.text))
        totals.append(row)
    return torch.tensor(totals, dtype=torch.float64), details


def build_batch(groups: list[list[Sample]], rewards: torch.Tensor, grpo) -> tuple[list[TrainSample], int]:
    """GRPO advantages per group; groups whose rewards are all equal carry no signal and are dropped if asked."""
    adv = group_advantages(rewards, scale=grpo.scale_rewards, eps=grpo.eps)
    batch, filtered = [], 0
    for samples, r, a in zip(groups, rewards, adv):
        if samples[0].finish_reason == "dropped" or (grpo.filter_groups and bool((r == r[0]).all())):
            filtered += 1
            continue
        batch += [TrainSample(s.prompt_ids, s.completion_ids, s.logprobs, float(x), s.weight_version)
                  for s, x in zip(samples, a) if s.completion_ids]
    return batch, filtered


def evaluate(engines: EngineGroup, test: PromptSet, cfg: Config) -> dict:
    """Greedy, one sample per question, strict tag rules (the same functions as the rewards)."""
    outs = engines.generate(test.ids, 1, temperature=0.0, max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens,
                            stop=cfg.rollout.stop)
    texts = [o[0].text for o in outs]
    acc = [accuracy_reward(t, ex.gold) for t, ex in zip(texts, test.examples)]
    fmt = [format_reward(t) for t in texts]
    return {"eval/accuracy": sum(acc) / len(acc), "eval/format_rate": sum(fmt) / len(fmt),
            "eval/completion_len": sum(len(o[0].completion_ids) for o in outs) / len(outs), "eval/n": len(acc)}


def step_row(groups, rewards, details, filtered, learner_stats, timer_parts, version) -> dict:
    live = torch.tensor([g[0].finish_reason != "dropped" for g in groups])
    flat = [s for g in groups for s in g if s.finish_reason != "dropped"]
    lengths = [len(s.completion_ids) for s in flat] or [0]
    kept = rewards[live] if live.any() else torch.zeros(1, 1, dtype=rewards.dtype)
    row = {"reward": float(kept.mean()), "reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
           **{k: sum(v) / max(len(v), 1) for k, v in details.items()},
           "completion_len": sum(lengths) / len(lengths), "completion_len_max": max(lengths),
           "truncated_frac": sum(s.finish_reason == "length" for s in flat) / max(len(flat), 1),
           "groups_filtered": filtered, "dropped_prompts": sum(g[0].finish_reason == "dropped" for g in groups),
           "weight_version": version, **learner_stats}
    gen_s = timer_parts.get("generate", 0.0)
    row["gen_tokens_per_s"] = sum(lengths) / gen_s if gen_s else 0.0
    if learner_stats.get("train_seconds"):
        row["train_tokens_per_s"] = learner_stats["train_tokens"] / learner_stats["train_seconds"]
    return row


def resume_point(cfg: Config, out: Path) -> Path | None:
    latest = checkpoint.latest_checkpoint(out)
    if cfg.train.resume == "must" and latest is None:
        raise FileNotFoundError(f"train.resume=must but {out}/checkpoints holds no complete checkpoint")
    if cfg.train.resume == "never" and latest is not None:
        raise FileExistsError(f"{out} already holds checkpoints ({latest.name}); use another train.output_dir or "
                              "train.resume=auto")
    return latest if cfg.train.resume != "never" else None


def save(learners: LearnerGroup, cfg: Config, out: Path, step: int, order: PromptOrder) -> Path:
    tmp = checkpoint.begin(out, step)
    learners.save(str(tmp))
    return checkpoint.commit(tmp, step, {"step": step, "order": order.state_dict(), "config": cfg.model_dump(mode="json")},
                             cfg.ckpt.keep)


def train(cfg: Config) -> dict:
    wall = time.time()
    out = Path(cfg.train.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    connect(cfg.train.ray_address)
    device = detect_device(cfg.train.device)
    resume_from = resume_point(cfg, out)
    learner_pg, rollout_pg = place(cfg, device)
    model_path = resolve_model(cfg.model.path)
    from transformers import AutoTokenizer

    # Actors start in the background (each resolves the model name on its own node) while prompts are tokenized.
    engines = EngineGroup(cfg.model.path, device, cfg.rollout, max_model_len=cfg.max_model_len, dtype=cfg.model.dtype,
                          seed=cfg.train.seed, placement_group=rollout_pg)
    learners = LearnerGroup(cfg.model.path, device, cfg.learner, cfg.grpo, total_steps=cfg.train.steps,
                            dtype=cfg.model.dtype, seed=cfg.train.seed, placement_group=learner_pg)
    train_set, test_set = load_prompts(cfg, AutoTokenizer.from_pretrained(model_path))
    log.info(f"device {device}; model {model_path}; {len(train_set.ids)} train / {len(test_set.ids)} eval prompts; "
             f"{cfg.learner.num_workers} learner rank(s), {cfg.rollout.num_engines} engine(s) × TP "
             f"{cfg.rollout.tensor_parallel_size}")
    engines.ready(), learners.ready()
    channel = WeightChannel(learners, engines, device, cfg.learner.broadcast_timeout_s)
    log.info(f"actors ready in {time.time() - wall:.0f}s; weight sync: {len(channel.plan)} bucket(s), "
             f"{channel.bytes / 2**20:.1f} MiB")

    start, order = 0, PromptOrder(len(train_set.ids), cfg.train.seed)
    if resume_from is not None:
        learners.load(str(resume_from))
        state = checkpoint.read_state(resume_from)
        if state["order"]["size"] != len(train_set.ids):
            raise ConfigError(f"{resume_from} was made with {state['order']['size']} training prompts, this run has "
                             f"{len(train_set.ids)} (data.source / max_prompt_tokens / model changed?): its data order "
                             "cannot continue; use a new train.output_dir")
        start, order = state["step"], PromptOrder.from_state(state["order"])
        channel.sync(start)  # engines start from the base model; give them the checkpoint's weights
        log.info(f"resumed from {resume_from} at step {start} (data epoch {order.epoch}, position {order.position})")
    metrics = MetricsLog(out, cfg, start)
    reward = WeightedReward(cfg.rewards)
    sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_tokens,
                    stop=cfg.rollout.stop)
    if cfg.eval.every and cfg.eval.at_start and start == 0:
        metrics.log(0, evaluate(engines, test_set, cfg))
        log.info(f"eval at step 0: {read_jsonl(metrics.path)[-1]}")

    progress = Progress(cfg.train.steps, start)
    step = start
    for step in range(start + 1, cfg.train.steps + 1):
        timer = StepTimer()
        batch_ids = order.next(cfg.train.prompts_per_step)                                   # 1. prompts
        with timer("generate"):                                                              # 2. n samples each
            groups = engines.generate([train_set.ids[i] for i in batch_ids], cfg.rollout.n, **sampling)
        with timer("reward"):                                                                # 3. rewards
            rewards, details = score(groups, [train_set.examples[i].gold for i in batch_ids], reward)
            batch, filtered = build_batch(groups, rewards, cfg.grpo)                        # 4. advantages
        learner_stats = {}
        if batch:
            with timer("train"):                                                             # 5. update
                learner_stats = learners.train_step(batch, cfg.rollout.temperature)
            with timer("broadcast"):                                                         # 6. weights out
                learner_stats.update(channel.sync(step))
        row = step_row(groups, rewards, details, filtered, learner_stats, timer.parts, groups[0][0].weight_version)
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
            with timer("eval"):
                row.update(evaluate(engines, test_set, cfg))
        if (cfg.ckpt.every and step % cfg.ckpt.every == 0) or step in (cfg.train.steps, cfg.train.stop_after):
            with timer("checkpoint"):
                save(learners, cfg, out, step, order)
        row.update(timer.report())
        metrics.log(step, row, extra={"batch_ids": [train_set.examples[i].idx for i in batch_ids]})  # 7. log
        print(progress.line(step) + "\n  " + format_row(step, row), flush=True)
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            print(format_sample(train_set.examples[batch_ids[0]], groups[0][0], rewards[0, 0].item()), flush=True)
        if step == cfg.train.stop_after:
            log.info(f"stopping after step {step} as train.stop_after asks; resume with the same output_dir")
            break
    metrics.close()

    if cfg.ckpt.export_hf and step == cfg.train.steps:
        learners.export_hf(str(out / "final_model"))
    rows = read_jsonl(metrics.path)
    plot_curves(rows, out / "curves.png", f"GRPO {cfg.model.path} on GSM8K ({device})")
    text = summary(rows, out, time.time() - wall)
    print(text, flush=True)
    engines.shutdown(), learners.shutdown()
    for pg in (learner_pg, rollout_pg):
        ray.util.remove_placement_group(pg)
    return {"step": step, "rows": rows, "summary": text, "output_dir": str(out)}


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
    parts = [f"reward {t['reward']:.3f}", f"acc {t['accuracy']:.3f}", f"fmt {t['format_rate']:.3f}",
             f"len {t['completion_len']:.0f}"]
    if "loss" in t:
        parts += [f"loss {t['loss']:+.4f}", f"kl {t['kl']:.4f}", f"clip {t['clip_frac']:.3f}",
                  f"ent {t['entropy']:.2f}", f"gnorm {t['grad_norm']:.3f}", f"lr {t['lr']:.2e}",
                  f"|Δlp| {t['logprob_mismatch']:.1e}"]
    else:
        parts.append("no update (every group filtered)")
    if "eval/accuracy" in t:
        parts.append(f"EVAL acc {t['eval/accuracy']:.3f} fmt {t['eval/format_rate']:.3f}")
    times = " ".join(f"{k[5:]} {v:.1f}" for k, v in t.items() if k.startswith("time/") and k != "time/step")
    parts.append(f"| {t['time/step']:.1f}s ({times}) gen {t['gen_tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


def format_sample(example: Example, sample: Sample, reward_value: float) -> str:
    text = sample.text if len(sample.text) < 1200 else sample.text[:1200] + " …"
    return (f"--- sample (reward {reward_value:.2f}, gold {example.gold}) ---\nQ: {example.question}\n"
            f"A: {text}\n---")
