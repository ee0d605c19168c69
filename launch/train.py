"""The GRPO training job, top to bottom: `train` checks the inputs and hands the job to the supervisor
(`launch.supervisor`: stop signals, in-job restarts); `run` is one attempt (actors up, the checkpoint loaded, the
loop, teardown); `loop` is the steps. The parts: `launch.actors` (start and stop), `launch.rollouts` (the rollout
source of each train.pipeline), `launch.weights` (learner → engines), `launch.batch` (a step's data and numbers),
`launch.console` (what is printed), `launch.checkpoint`."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.models import resolve_model
from launch import checkpoint
from launch.actors import Actors, check_inputs, reap_leftovers, record, start_actors, stop_actors
from launch.batch import PromptSet, Rollout, StepTimer, collect, evaluate, load_prompts, make_scorer, step_row
from launch.cluster import connect, detect_device
from launch.config import Config, ConfigError
from launch.console import Progress, format_row, format_sample
from launch.data import PromptOrder
from launch.exits import STOPPED
from launch.metrics import MetricsLog, plot_curves, read_jsonl, summary
from launch.outputs import resolve_output_dir
from launch.rollouts import OneStepOff, Synchronous
from launch.supervisor import INFRA_FAULTS, Faults, StopRequested, StopSignals, supervise
from learner.group import LearnerGroup
from rewards import Scorer

log = logging.getLogger("rlvr")


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
    return supervise(cfg, out, lambda stop, faults: run(cfg, out, device, stop, faults, wall))


@dataclass
class Job:
    """What an attempt's loop works with."""

    cfg: Config
    out: Path
    stop: StopSignals
    faults: Faults
    actors: Actors
    metrics: MetricsLog
    scorer: Scorer
    train_set: PromptSet
    eval_sets: list[PromptSet]
    logged: list[int] = field(default_factory=lambda: [0, 0])  # engine restarts, replacement checks logged


def run(cfg: Config, out: Path, device: str, stop: StopSignals, faults: Faults, wall: float) -> dict:
    """One attempt: actors up, the checkpoint (if any) loaded, the loop; its actors are torn down however it ends."""
    resume_from = resume_point(cfg, out) if faults.job_restarts == 0 else checkpoint.latest_checkpoint(out)
    scorer = make_scorer(cfg)  # its pool starts at the first pooled score
    reap_leftovers(out)  # a killed driver's actors, before this one's take their place
    actors = start_actors(cfg, device, faults)
    metrics = source = None
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
        info = actors.learners.infos[0]
        layout = info["layout"] + (f" ({info['layout_note']})" if info["layout_note"] else "")
        log.info(f"actors ready in {time.time() - wall:.0f}s; weight sync: {len(actors.channel.plan)} bucket(s), "
                 f"{actors.channel.bytes / 2**20:.1f} MiB; learner layout {layout}")
        record(out, actors)
        start, order = restore(cfg, actors, resume_from, len(train_set.ids))
        faults.recovered()
        if faults.driver_restarts and faults.job_restarts == 0:  # a new driver: what the dead one logged last
            faults.after_driver_loss(read_jsonl(out / "metrics.jsonl"), start)
        metrics = MetricsLog(out, cfg, start)
        job = Job(cfg, out, stop, faults, actors, metrics, scorer, train_set, eval_sets)
        source = rollout_source(job, order)
        step = loop(job, source, start)
        metrics.close()
        if cfg.ckpt.export_hf and step == cfg.train.steps:
            actors.learners.export_hf(str(out / "final_model"))
    finally:
        if metrics is not None:
            metrics.close()
        stop_actors(actors, faults)
        if source is not None:
            source.close()  # after the engines are gone: a rollout still running ends on them
        scorer.close()  # after the rollout thread has ended
    rows = read_jsonl(metrics.path)
    plot_curves(rows, out / "curves.png", f"GRPO {cfg.model.path} on {cfg.task.name} ({device})")
    text = summary(rows, out, time.time() - wall, cfg.task.name)
    print(text, flush=True)
    return {"step": step, "rows": rows, "summary": text, "output_dir": str(out)}


def loop(job: Job, source: Synchronous, start: int) -> int:
    """Steps start + 1 … train.steps (or train.stop_after); returns the last step done. Each step: rollout → update
    (train, then the weights out, under the channel's lock, so that a replacement engine's resync in the rollout
    thread never lands inside a learner call) → eval when due → checkpoint when due → log."""
    cfg, stop, learners, channel = job.cfg, job.stop, job.actors.learners, job.actors.channel
    if cfg.eval.every and cfg.eval.at_start and start == 0:
        job.metrics.log(0, evaluate(channel, job.eval_sets, cfg, job.scorer))
        log.info(f"eval at step 0: {read_jsonl(job.metrics.path)[-1]}")
    if stop.requested:  # before the first step: nothing new to save
        raise StopRequested(f"{stop.requested}: stopped before step {start + 1}; submit the same command again to "
                            f"continue (exit code {STOPPED})")
    step, progress = start, Progress(cfg.train.steps, start)
    for step in range(start + 1, cfg.train.steps + 1):
        timer = StepTimer()
        ro = source.next(step, timer)                                       # 1-4. prompts, samples, rewards,
        stats, sent, learner_version = None, {}, channel.learner_version   # advantages
        with channel.lock:
            if ro.batch:
                with timer("train"):                                        # 5. update
                    stats = learners.train_step(ro.batch, cfg.rollout.temperature, cfg.rollout.max_tokens)
                channel.learner_version = step
                sent = source.weights_out(step, timer)                      # 6. weights out
        row = {**step_row(ro, stats, learner_version, cfg.grpo.refill), **sent}
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
            source.settle(timer)
            with timer("eval"):                                             # 7. eval
                row.update(evaluate(channel, job.eval_sets, cfg, job.scorer))
        if (cfg.ckpt.every and step % cfg.ckpt.every == 0) or step in (cfg.train.steps, cfg.train.stop_after) \
                or stop.requested:
            with timer("checkpoint"), channel.lock:                         # 8. checkpoint
                save_or_go_on(job, step, ro.order_state)
        log_step(job, step, ro, row, timer, progress)                       # 9. log
        if stop.requested:
            raise StopRequested(f"{stop.requested}: stopped after step {step} with its checkpoint in {job.out}; "
                                f"submit the same command again to continue (exit code {STOPPED})")
        if step == cfg.train.stop_after:
            log.info(f"stopping after step {step} as train.stop_after asks; resume with the same output_dir")
            break
    return step


def rollout_source(job: Job, order: PromptOrder) -> Synchronous:
    cfg, channel = job.cfg, job.actors.channel

    def draw() -> Rollout:
        return collect(cfg, channel, job.train_set, order, job.scorer)

    if cfg.train.pipeline == "one_step_off":
        return OneStepOff(draw, channel, min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps), job.stop)
    return Synchronous(draw, channel)


def log_step(job: Job, step: int, ro: Rollout, row: dict, timer: StepTimer, progress: Progress) -> None:
    """The step's row to every metrics sink (with its faults and timings), its lines to the console."""
    faulted = job.faults.row(job.actors.engines, job.actors.channel, job.logged)
    row.update(timer.report(), **faulted.pop("numbers"), **job.scorer.failures())
    job.metrics.log(step, row, extra={"batch_ids": [job.train_set.examples[i].idx for i in ro.batch_ids], **faulted})
    job.faults.last_step = step
    record(job.out, job.actors)
    print(progress.line(step) + "\n  " + format_row(step, row), flush=True)
    if job.cfg.log.sample_every and step % job.cfg.log.sample_every == 0:
        print(format_sample(job.train_set.examples[ro.batch_ids[0]], ro.groups[0][0], ro.rewards[0, 0].item()),
              flush=True)


def resume_point(cfg: Config, out: Path) -> Path | None:
    latest = checkpoint.latest_checkpoint(out)
    if cfg.train.resume == "must" and latest is None:
        raise FileNotFoundError(f"train.resume=must but {out}/checkpoints holds no complete checkpoint")
    if cfg.train.resume == "never" and latest is not None:
        raise FileExistsError(f"{out} already holds checkpoints ({latest.name}); use another train.output_dir or "
                              "train.resume=auto")
    return latest if cfg.train.resume != "never" else None


def restore(cfg: Config, actors: Actors, resume_from: Path | None, prompts: int) -> tuple[int, PromptOrder]:
    """The step to continue after and the data order there: the checkpoint's, loaded into the learner and sent to
    the engines (which start from the base model), or step 0."""
    if resume_from is None:
        return 0, PromptOrder(prompts, cfg.train.seed)
    actors.learners.load(str(resume_from))
    state = checkpoint.read_state(resume_from)
    if state["order"]["size"] != prompts:
        raise ConfigError(f"{resume_from} was made with {state['order']['size']} training prompts, this run has "
                          f"{prompts} (data.source / max_prompt_tokens / model changed?): its data order cannot "
                          "continue; use a new train.output_dir")
    start, order = state["step"], PromptOrder.from_state(state["order"])
    actors.channel.sync(start)
    log.info(f"resumed from {resume_from} at step {start} (data epoch {order.epoch}, position {order.position})")
    return start, order


def save_or_go_on(job: Job, step: int, order_state: dict) -> None:
    """`save`; a checkpoint that cannot be written stops the run or, with ckpt.on_error=continue, is skipped."""
    try:
        save(job.actors.learners, job.cfg, job.out, step, order_state)
    except checkpoint.CheckpointWriteFailed as err:
        several = len(job.actors.learners.workers) > 1 and not err.before_writing  # ranks may be mid-collective
        if job.cfg.ckpt.on_error == "stop" or several:
            raise
        job.faults.checkpoint_failures += 1
        log.warning(f"{err}\nckpt.on_error=continue: going on without the checkpoint of step {step} "
                    f"({job.faults.checkpoint_failures} failed so far); a restart resumes from the last complete one")


def save(learners: LearnerGroup, cfg: Config, out: Path, step: int, order_state: dict) -> Path:
    """A complete checkpoint of `step` (kept as it is if one exists): every rank's shards, checked visible to every
    rank and to the driver, then the trainer state, committed atomically (see `launch.checkpoint`). Raises
    `CheckpointWriteFailed` when it cannot be written, with the previous checkpoint left as it was."""
    if checkpoint.exists(out, step):
        return checkpoint.checkpoints_dir(out) / checkpoint.step_name(step)
    need = checkpoint.bytes_needed(out, learners.infos[0]["params"])
    checkpoint.room(out, step, need)
    tmp = checkpoint.begin(out, step)
    try:
        views = learners.save(str(tmp))
        written = {f: size for view in views for f, size in view.items()}
        for r, view in enumerate(views):
            checkpoint.check_visible(view, written, learners.name(r), tmp)
        checkpoint.check_visible(checkpoint.manifest(tmp), written, "the driver", tmp)
        state = {"step": step, "order": order_state, "config": cfg.model_dump(mode="json")}
        return checkpoint.commit(tmp, step, state, cfg.ckpt.keep)
    except INFRA_FAULTS + (checkpoint.CheckpointNotShared,):
        raise  # a dead or hung rank: the job restarts from the last complete checkpoint
    except (OSError, RuntimeError) as err:  # a rank's write failed (no space, read-only, quota)
        checkpoint.discard(tmp)
        free = shutil.disk_usage(tmp.parent).free
        raise checkpoint.CheckpointWriteFailed(
            f"could not write the checkpoint {tmp.parent / checkpoint.step_name(step)} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1][:300]}); {free / 2**20:.1f} MiB are free on its filesystem and it "
            f"needs about {need / 2**20:.1f} MiB; the last complete checkpoint is left as it was", False) from err
