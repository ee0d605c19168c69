"""The job's actors: placement groups, the learner ranks and the engines started in them, the weight channel
between them, and their teardown (which also runs after a failure, and never masks the error in flight)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from core.models import check_model
from core.reap import reap
from launch.cluster import place
from launch.config import Config, ConfigError
from launch.outputs import alive_on_this_host, this_process
from launch.supervisor import Faults
from launch.weights import WeightChannel
from learner.group import LearnerGroup
from rewards import check_functions, load_function
from rollout.env import spec_of
from rollout.group import EngineGroup

log = logging.getLogger("rlvr")


@dataclass
class Actors:
    learners: LearnerGroup | None
    engines: EngineGroup | None
    channel: WeightChannel | None
    placement_groups: tuple
    recorded: str = ""  # what `record` last wrote

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
    try:
        if cfg.env.name:
            load_function(spec_of(cfg.env.name))
    except ValueError as err:
        raise ConfigError(f"env.name: {err}") from None


def start_actors(cfg: Config, device: str, faults: Faults, learner_too: bool = True) -> Actors:
    """Placement groups and actors (engines only unless `learner_too`); the actors start in the background (each
    resolves the model on its own node)."""
    learner_pg, rollout_pg = place(cfg, device, learner_too=learner_too)
    actors = Actors(None, None, None, tuple(pg for pg in (learner_pg, rollout_pg) if pg is not None))
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
    """Kill every actor and free the placement groups (a rollout still running in another thread then ends on its
    killed engines: no engine is replaced after shutdown)."""
    faults.engine_restarts += len(actors.engines.restarts) if actors.engines else 0
    groups = [g for g in (actors.engines, actors.learners) if g is not None]
    for stop in (*(g.shutdown for g in groups),
                 *(lambda pg=pg: ray.util.remove_placement_group(pg) for pg in actors.placement_groups)):
        try:
            stop()
        except Exception as err:  # noqa: BLE001 - best effort: the cluster may be half gone
            log.warning(f"teardown: {type(err).__name__}: {err}")


RECORD = "actors.json"  # in the output dir: the driver's process and its actors' process trees


def record(out: Path, actors: Actors) -> None:
    """Write down which processes this driver's actors are (after they start, and at every step, so that a
    replacement is in it): if the driver is killed, the next one reaps them (`reap_leftovers`)."""
    infos = [i for g in (actors.engines, actors.learners) if g is not None for i in g.infos if i.get("tree")]
    text = json.dumps({"driver": this_process(), "actors": infos})
    if text == actors.recorded:
        return  # no actor replaced since the last write
    tmp = out / (RECORD + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, out / RECORD)
        actors.recorded = text
    except OSError as err:  # best effort (a full disk): Ray kills a dead driver's actors by itself anyway
        log.warning(f"could not write {out / RECORD}: {err}")


def reap_leftovers(out: Path) -> None:
    """Before a driver starts its actors: if the run's previous driver died (killed, crashed) without tearing its
    actors down, make sure they are gone. Ray kills a dead driver's actors itself; a stopped one (SIGSTOP), or one
    whose children outlive it, is what this reaps (`core.reap.reap`: SIGKILL from a task on its node)."""
    path = out / RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    driver = rec.get("driver", {})
    if alive_on_this_host(driver):
        return  # that driver is alive: this is an in-job restart of it, or another process
    log.info(f"the previous driver (pid {driver.get('pid')}) is gone: reaping what is left of its "
             f"{len(rec.get('actors', []))} actor process tree(s)")
    reap(rec.get("actors", []), 30.0)
    path.unlink(missing_ok=True)
