"""The GRPO training job: one loop that reads top to bottom (`loop`), run by a supervisor (`train`) that restarts
it from its checkpoint inside the same job when the machinery fails."""
from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import ActorUnavailableError, NodeDiedError, ObjectLostError, RayActorError, RaySystemError

from core.models import check_model, resolve_model
from core.types import Sample
from core.waits import ActorFault
from launch import checkpoint
from launch.batch import (PromptSet, Rollout, StepTimer, check_versions, collect, evaluate, load_prompts, make_scorer,
                          step_row)
from launch.cluster import WeightChannel, connect, detect_device, place
from launch.config import Config, ConfigError, dump_config
from launch.data import Example, PromptOrder
from launch.metrics import MetricsLog, plot_curves, read_jsonl, summary
from launch.outputs import OutputLock, resolve_output_dir
from learner.group import LearnerGroup
from rewards import Scorer, check_functions
from rollout.group import EngineGroup

log = logging.getLogger("rlvr")


def resume_point(cfg: Config, out: Path) -> Path | None:
    latest = checkpoint.latest_checkpoint(out)
    if cfg.train.resume == "must" and latest is None:
        raise FileNotFoundError(f"train.resume=must but {out}/checkpoints holds no complete checkpoint")
    if cfg.train.resume == "never" and latest is not None:
        raise FileExistsError(f"{out} already holds checkpoints ({latest.name}); use another train.output_dir or "
                              "train.resume=auto")
    return latest if cfg.train.resume != "never" else None


def save(learners: LearnerGroup, cfg: Config, out: Path, step: int, order_state: dict) -> Path:
    """A complete checkpoint of `step` (kept as it is if one exists): every rank's shards, checked visible to every
    rank and to the driver, then the trainer state, committed atomically (see `launch.checkpoint`)."""
    if checkpoint.exists(out, step):
        return checkpoint.checkpoints_dir(out) / checkpoint.step_name(step)
    tmp = checkpoint.begin(out, step)
    views = learners.save(str(tmp))
    written = {f: size for view in views for f, size in view.items()}
    for r, view in enumerate(views):
        checkpoint.check_visible(view, written, learners.name(r), tmp)
    checkpoint.check_visible(checkpoint.manifest(tmp), written, "the driver", tmp)
    state = {"step": step, "order": order_state, "config": cfg.model_dump(mode="json")}
    return checkpoint.commit(tmp, step, state, cfg.ckpt.keep)


# Failures of the machinery, not of the config or the math: the job restarts from its checkpoint (train.max_restarts).
INFRA_FAULTS = (ActorFault, TimeoutError, torch.distributed.DistError, RayActorError, ActorUnavailableError,
                ObjectLostError, NodeDiedError, RaySystemError)
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGINT after writing a checkpoint; resubmit to continue (sysexits EX_TEMPFAIL)


class StopRequested(Exception):
    """SIGTERM or SIGINT reached the job, which stopped at a step boundary after writing a checkpoint."""


class RestartsExhausted(RuntimeError):
    """The machinery failed again after train.max_restarts in-job restarts."""


@dataclass
class Faults:
    """What went wrong over the whole job, across its in-job restarts."""

    job_restarts: int = 0
    steps_recomputed: int = 0
    engine_restarts: int = 0  # engines replaced in earlier attempts (the current EngineGroup counts its own)
    last_step: int = 0  # the last step logged
    failed_at: float | None = None  # when the last in-job restart began (monotonic)
    recover_seconds: float | None = None  # failure → actors up and the checkpoint loaded, reported once


class StopSignals:
    """SIGTERM and SIGINT (`ray job stop`, a preempted node, Ctrl-C) only raise a flag; the loop writes a checkpoint
    at the end of the step and exits with EXIT_STOPPED. A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested: str | None = None
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning(f"{self.requested} received: stopping after this step, with a checkpoint")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> dict:
    """Run the job. When the machinery fails (an actor dies or hangs, a collective breaks), every actor and
    placement group is torn down and the run resumes from its latest complete checkpoint inside the same job, up to
    train.max_restarts times: at most ckpt.every steps are computed again per restart."""
    wall = time.time()
    check_inputs(cfg)
    out = resolve_output_dir(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info(f"output dir {out}")
    connect(cfg.train.ray_address)
    device = detect_device(cfg.train.device, cfg)
    faults = Faults()
    with OutputLock(out), StopSignals() as stop:
        (out / "config.yaml").write_text(dump_config(cfg))
        while True:
            try:
                return run(cfg, out, device, stop, faults, wall)
            except INFRA_FAULTS as err:
                latest = checkpoint.latest_checkpoint(out)
                resume_step = checkpoint.read_state(latest)["step"] if latest else 0
                if faults.job_restarts >= cfg.train.max_restarts:
                    raise RestartsExhausted(f"{type(err).__name__}: {err}\nafter {faults.job_restarts} in-job "
                                            f"restart(s) (train.max_restarts={cfg.train.max_restarts})") from err
                redo = faults.last_step + 1 - resume_step  # the steps done since the checkpoint and the one in flight
                faults.job_restarts, faults.steps_recomputed = faults.job_restarts + 1, faults.steps_recomputed + redo
                faults.failed_at = time.monotonic()
                log.warning(f"{type(err).__name__}: {err}\nrestart {faults.job_restarts}/{cfg.train.max_restarts}: "
                            f"every actor torn down; resuming from {latest.name if latest else 'the start'}: steps "
                            f"{resume_step + 1}-{faults.last_step + 1} are computed again")


@dataclass
class Actors:
    learners: LearnerGroup | None
    engines: EngineGroup | None
    channel: WeightChannel | None
    placement_groups: tuple
    rollouts: ThreadPoolExecutor | None = None  # train.pipeline: one_step_off generates here while the learner trains

    def connect(self, cfg: Config, device: str, verify_prompt: list[int]) -> None:
        """Wait until every actor has started, then open the weight channel."""
        self.engines.ready(), self.learners.ready()
        self.channel = WeightChannel(self.learners, self.engines, device, cfg.timeouts.broadcast_s,
                                     verify_prompt if cfg.rollout.verify_restarts else None)


def check_inputs(cfg: Config) -> None:
    """Fail before any actor starts when the model cannot be had or a user reward does not load."""
    check_model(cfg.model.path)
    try:
        check_functions(cfg.task.functions)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def start_actors(cfg: Config, device: str, faults: Faults, learner_too: bool = True) -> Actors:
    """Placement groups and actors (engines only unless `learner_too`); the actors start in the background (each
    resolves the model on its own node)."""
    learner_pg, rollout_pg = place(cfg, device, learner_too=learner_too)
    actors = Actors(None, None, None, tuple(pg for pg in (learner_pg, rollout_pg) if pg is not None))
    if cfg.train.pipeline == "one_step_off":
        actors.rollouts = ThreadPoolExecutor(1, thread_name_prefix="rollout")
    try:
        actors.engines = EngineGroup(cfg.model.path, device, cfg.rollout, max_model_len=cfg.max_model_len,
                                     dtype=cfg.model.dtype, seed=cfg.train.seed, placement_group=rollout_pg,
                                     timeouts=cfg.timeouts,
                                     max_restarts=cfg.rollout.max_restarts - faults.engine_restarts)
        if learner_too and engines_first(cfg, device):
            actors.engines.ready()
            log.info(f"engines ready; starting the learner (rollout.engines_first on {device})")
        if learner_too:
            actors.learners = LearnerGroup(cfg.model.path, device, cfg.learner, cfg.grpo, total_steps=cfg.train.steps,
                                           dtype=cfg.model.dtype, seed=cfg.train.seed, placement_group=learner_pg,
                                           timeouts=cfg.timeouts)
    except BaseException:
        stop_actors(actors, faults)
        raise
    return actors


def engines_first(cfg: Config, device: str) -> bool:
    """Whether the learner waits for the engines to serve before it starts (`rollout.engines_first`)."""
    return device == "cuda" if cfg.rollout.engines_first is None else cfg.rollout.engines_first


def stop_actors(actors: Actors, faults: Faults) -> None:
    """Kill every actor and free the placement groups (also after a failure: never masks the error in flight)."""
    faults.engine_restarts += len(actors.engines.restarts) if actors.engines else 0
    groups = [g for g in (actors.engines, actors.learners) if g is not None]
    for stop in (*(g.shutdown for g in groups),
                 *(lambda pg=pg: ray.util.remove_placement_group(pg) for pg in actors.placement_groups)):
        try:
            stop()
        except Exception as err:  # noqa: BLE001 - best effort: the cluster may be half gone
            log.warning(f"teardown: {type(err).__name__}: {err}")
    if actors.rollouts is not None:  # a rollout still running ends on its killed engines (no restart after shutdown)
        actors.rollouts.shutdown(wait=True, cancel_futures=True)


def run(cfg: Config, out: Path, device: str, stop: StopSignals, faults: Faults, wall: float) -> dict:
    """One attempt: actors up, the checkpoint (if any) loaded, the loop; its actors are torn down however it ends."""
    resume_from = resume_point(cfg, out) if faults.job_restarts == 0 else checkpoint.latest_checkpoint(out)
    scorer = make_scorer(cfg)  # its pool starts at the first pooled score
    actors = start_actors(cfg, device, faults)
    metrics = None
    try:
        from transformers import AutoTokenizer

        model_path = resolve_model(cfg.model.path)
        train_set, eval_sets = load_prompts(cfg, AutoTokenizer.from_pretrained(model_path))  # while actors start
        log.info(f"task {cfg.task.name}; device {device}; model {model_path}; {len(train_set.ids)} train / "
                 f"{' + '.join(str(len(e.ids)) for e in eval_sets)} eval prompts; {cfg.learner.num_workers} learner "
                 f"rank(s), {cfg.rollout.num_engines} engine(s) × TP {cfg.rollout.tensor_parallel_size}; pipeline "
                 f"{cfg.train.pipeline}")
        if cfg.train.pipeline == "one_step_off" and cfg.grpo.importance == "off":
            log.warning("train.pipeline: one_step_off samples from weights one update behind the learner, and "
                        "grpo.importance: off leaves that gap uncorrected")
        actors.connect(cfg, device, train_set.ids[0])
        log.info(f"actors ready in {time.time() - wall:.0f}s; weight sync: {len(actors.channel.plan)} bucket(s), "
                 f"{actors.channel.bytes / 2**20:.1f} MiB")
        start, order = 0, PromptOrder(len(train_set.ids), cfg.train.seed)
        if resume_from is not None:
            actors.learners.load(str(resume_from))
            state = checkpoint.read_state(resume_from)
            if state["order"]["size"] != len(train_set.ids):
                raise ConfigError(f"{resume_from} was made with {state['order']['size']} training prompts, this run "
                                  f"has {len(train_set.ids)} (data.source / max_prompt_tokens / model changed?): its "
                                  "data order cannot continue; use a new train.output_dir")
            start, order = state["step"], PromptOrder.from_state(state["order"])
            actors.channel.sync(start)  # engines start from the base model; give them the checkpoint's weights
            log.info(f"resumed from {resume_from} at step {start} (data epoch {order.epoch}, "
                     f"position {order.position})")
        if faults.failed_at is not None:
            faults.recover_seconds, faults.failed_at = time.monotonic() - faults.failed_at, None
            log.warning(f"recovered in {faults.recover_seconds:.1f}s (in-job restart {faults.job_restarts})")
        metrics = MetricsLog(out, cfg, start)
        step = loop(cfg, out, stop, faults, actors, metrics, scorer, train_set, eval_sets, start, order)
        metrics.close()
        if cfg.ckpt.export_hf and step == cfg.train.steps:
            actors.learners.export_hf(str(out / "final_model"))
    finally:
        if metrics is not None:
            metrics.close()
        stop_actors(actors, faults)
        scorer.close()  # after the rollout thread has ended
    rows = read_jsonl(metrics.path)
    plot_curves(rows, out / "curves.png", f"GRPO {cfg.model.path} on {cfg.task.name} ({device})")
    text = summary(rows, out, time.time() - wall)
    print(text, flush=True)
    return {"step": step, "rows": rows, "summary": text, "output_dir": str(out)}


def loop(cfg: Config, out: Path, stop: StopSignals, faults: Faults, actors: Actors, metrics: MetricsLog,
         scorer: Scorer, train_set: PromptSet, eval_sets: list[PromptSet], start: int, order: PromptOrder) -> int:
    """The training loop, from step `start` + 1; returns the last step done. With train.pipeline: one_step_off the
    rollout of step k + 1 runs in a thread while the learner trains step k (`channel.lock` keeps a replacement
    engine's resync from landing inside a learner call)."""
    learners, engines, channel = actors.learners, actors.engines, actors.channel
    sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_tokens,
                    stop=cfg.rollout.stop)
    ahead, last = cfg.train.pipeline == "one_step_off", min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)

    def rollout() -> Rollout:
        version = channel.version  # what the engines hold as the rollout starts
        ro = collect(cfg, engines, train_set, order, scorer, sampling)
        ro.version = version
        return ro

    def engines_catch_up(timer: StepTimer) -> None:  # between batches: the learner's latest weights out
        if channel.version != channel.learner_version:
            with timer("broadcast"):
                channel.sync(channel.learner_version)

    if cfg.eval.every and cfg.eval.at_start and start == 0:
        metrics.log(0, evaluate(engines, eval_sets, cfg, scorer))
        log.info(f"eval at step 0: {read_jsonl(metrics.path)[-1]}")

    progress = Progress(cfg.train.steps, start)
    step, pending = start, None  # pending: the next step's rollout, generating while this step trains
    seen = [0, 0]  # engine restarts and replacement checks already logged
    if stop.requested:  # before the first step: nothing new to save
        raise StopRequested(f"{stop.requested}: stopped before step {start + 1}; submit the same command again to "
                            f"continue (exit code {EXIT_STOPPED})")
    for step in range(start + 1, cfg.train.steps + 1):
        timer = StepTimer()
        background = pending is not None
        if not background:                                                       # 1-4. prompts, samples, rewards,
            ro = rollout()                                                       #      advantages
            for k in ("generate", "reward"):
                timer.add(k, ro.parts.get(k, 0.0))
        else:
            with timer("generate"):  # the part of the rollout the learner waited for
                ro, pending = pending.result(), None
        check_versions(ro.groups, {ro.version, channel.learner_version})
        learner_version = channel.learner_version  # before this step's update
        if ahead and step < last and not stop.requested:
            engines_catch_up(timer)
            pending = actors.rollouts.submit(rollout)
        learner_stats = {}
        with channel.lock:
            if ro.batch:
                with timer("train"):                                                     # 5. update
                    learner_stats = learners.train_step(ro.batch, cfg.rollout.temperature, cfg.rollout.max_tokens)
                channel.learner_version = step
                if not ahead:
                    with timer("broadcast"):                                             # 6. weights out
                        learner_stats.update(channel.sync(step))
        row = step_row(ro.groups, ro.rewards, ro.details, ro.filtered, learner_stats, ro.parts,
                       min(s.weight_version for g in ro.groups for s in g), learner_version)
        if background:
            row["rollout_seconds"] = ro.parts.get("generate", 0.0) + ro.parts.get("reward", 0.0)
        if cfg.grpo.refill:
            row.update(refill_prompts=ro.refill_prompts, refill_capped=float(ro.refill_capped))
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
            if pending is not None:  # the engines finish the next batch, then evaluate this step's weights
                with timer("generate"):
                    pending = done(pending.result())
            engines_catch_up(timer)
            with timer("eval"):
                row.update(evaluate(engines, eval_sets, cfg, scorer))
        if (cfg.ckpt.every and step % cfg.ckpt.every == 0) or step in (cfg.train.steps, cfg.train.stop_after) \
                or stop.requested:
            with timer("checkpoint"), channel.lock:
                save(learners, cfg, out, step, ro.order_state)
        faulted = fault_row(engines, channel, faults, seen)
        row.update(timer.report(), **faulted.pop("numbers"), **scorer.failures())
        metrics.log(step, row, extra={"batch_ids": [train_set.examples[i].idx for i in ro.batch_ids], **faulted})
        faults.last_step = step                                                          # 7. log
        print(progress.line(step) + "\n  " + format_row(step, row), flush=True)
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            print(format_sample(train_set.examples[ro.batch_ids[0]], ro.groups[0][0], ro.rewards[0, 0].item()),
                  flush=True)
        if stop.requested:
            raise StopRequested(f"{stop.requested}: stopped after step {step} with its checkpoint in {out}; "
                                f"submit the same command again to continue (exit code {EXIT_STOPPED})")
        if step == cfg.train.stop_after:
            log.info(f"stopping after step {step} as train.stop_after asks; resume with the same output_dir")
            break
    return step


def done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def fault_row(engines: EngineGroup, channel: WeightChannel, faults: Faults, seen: list[int]) -> dict:
    """Restart counters (whole job) and the recoveries ended since the last row (`seen` counts those logged; a
    replacement still recovering in the rollout thread waits for the next row): their seconds, how replacements
    checked out against the learner ("numbers", for every sink), and each replacement's record (metrics.jsonl only)."""
    new = list(itertools.takewhile(lambda r: "seconds" in r, engines.restarts[seen[0]:]))
    checks = channel.checks[seen[1]:]
    seen[0], seen[1] = seen[0] + len(new), seen[1] + len(checks)
    numbers = {"engine_restarts": faults.engine_restarts + len(engines.restarts), "job_restarts": faults.job_restarts,
               "steps_recomputed": faults.steps_recomputed,
               "recover_seconds": sum(r.get("seconds", 0.0) for r in new)}
    if faults.recover_seconds is not None:
        numbers["job_recover_seconds"], faults.recover_seconds = faults.recover_seconds, None
    if checks:
        numbers["replacement_greedy_match"] = float(all(c["greedy_match"] for c in checks))
        numbers["replacement_max_abs_logprob_diff"] = max(c["max_abs_logprob_diff"] for c in checks)
    out = {"numbers": numbers}
    if new:
        out["restarts"] = [{k: v for k, v in r.items() if k != "start"} for r in new]
    if checks:
        out["replacement_checks"] = checks
    return out


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
    text = sample.text if len(sample.text) < 1200 else sample.text[:1200] + " …"
    question = example.question if isinstance(example.question, str) else example.question[-1]["content"]
    return (f"--- sample (reward {reward_value:.2f}, gold {example.gold}) ---\nQ: {question}\n"
            f"A: {text}\n---")
