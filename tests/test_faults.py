"""Faults in a running job, made with real signals: kill -9 and SIGSTOP of engine and learner processes.

The driver runs in this process (`launch.train.train`, the function `launch/gsm8k.py` calls inside `ray job submit`)
on the session's local Ray cluster; a thread watches where the driver is (its live call stack) and which actor runs
which method (Ray's process titles), and sends the signal at the moment each test names. Every run is compared with
an undisturbed run of the same config: the same steps, once each, on the same prompts, with all their groups.
"""
import os
import signal
import threading
import time

import pytest

from launch.config import load_config
from launch.metrics import read_jsonl
from launch.train import train
from tests import procs

pytestmark = pytest.mark.integration

STEPS, PROMPTS, N = 6, 4, 8
ARGS = ["train.device=cpu", f"train.steps={STEPS}", f"train.prompts_per_step={PROMPTS}", f"rollout.n={N}",
        "rollout.num_engines=2",
        "eval.every=0", "log.sample_every=0", "log.tensorboard=false", "ckpt.every=2", "ckpt.export_hf=false",
        "timeouts.generate_s=20", "timeouts.broadcast_s=15"]


def steps_done(out) -> int:
    try:
        return len([r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r])
    except ValueError:  # a line read while it is being written
        return 0


class Saboteur(threading.Thread):
    """Runs `act` beside the driver; keeps what it returned or raised."""

    def __init__(self, act):
        super().__init__(daemon=True)
        self.act, self.result, self.error = act, None, None

    def run(self):
        try:
            self.result = self.act()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def run_job(out, act=None, *extra):
    cfg = load_config("toy_tiny_cpu.yaml", ARGS + [f"train.output_dir={out}", *extra])
    saboteur = Saboteur(act) if act else None
    if saboteur:
        saboteur.start()
    train(cfg)
    if saboteur:
        saboteur.join(timeout=10)
        assert saboteur.error is None, f"the fault was not injected: {saboteur.error!r}"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    leftovers = procs.wait_for(lambda: not (procs.actor_pids("RolloutEngine") or procs.actor_pids("LearnerWorker")),
                               30, 0.5, "every actor process gone after the run")
    assert leftovers
    return rows, saboteur.result if saboteur else None


@pytest.fixture(scope="module")
def undisturbed(ray_local, cpu_vllm, tmp_path_factory):
    rows, _ = run_job(tmp_path_factory.mktemp("undisturbed"))
    return rows


def assert_complete(rows, undisturbed, behind: int = 0):
    """Every step once, the undisturbed run's prompts, all groups with all samples, the expected weights (those of
    the update before the step, or before the one before it when the rollout runs one step ahead)."""
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["batch_ids"] for r in rows] == [r["batch_ids"] for r in undisturbed]
    for r in rows:
        assert (r["groups"], r["samples"], r["dropped_prompts"]) == (PROMPTS, PROMPTS * N, 0), r
    updated = [r["step"] for r in rows if "loss" in r]
    for r in rows:
        assert r["weight_version"] == max([s for s in updated if s < r["step"] - behind], default=0), r


def engine_generating():
    """An engine process while it generates, as long as the driver is in the generate phase."""
    if not procs.driver_in("generate", "rollout/group.py"):
        return None
    return next((pid for pid, t in procs.actor_pids("RolloutEngine").items() if ".generate" in t), None)


def restarts_of(rows):
    return [r for row in rows for r in row.get("restarts", [])]


def assert_replacement_follows_the_learner(rows):
    """Checked at readmission and again after the next ordinary sync: greedy tokens are the learner's argmax, and
    their logprobs are the learner's (fp32 on CPU: within 1e-4)."""
    checks = [c for row in rows for c in row.get("replacement_checks", [])]
    assert len(checks) == 2 and checks[1]["version"] == checks[0]["version"] + 1, checks
    for c in checks:
        assert c["greedy_match"] and c["max_abs_logprob_diff"] < 1e-4, c


def hit_an_engine_generating(out, sig):
    """A fault: once step 2 is done, `sig` to an engine process while it generates; returns its pid."""
    def act():
        procs.wait_for(lambda: steps_done(out) >= 2, 300, 0.05, "step 2 done")
        pid = procs.wait_for(engine_generating, 120, what="an engine generating")
        os.kill(pid, sig)
        return pid
    return act


def the_restart(rows, phase: str, pid: int) -> dict:
    """The one engine restart of the run: in `phase`, of the process `pid`; counted once."""
    restarts = restarts_of(rows)
    assert len(restarts) == 1 and rows[-1]["engine_restarts"] == 1, restarts
    assert restarts[0]["phase"] == phase and f"pid {pid}" in restarts[0]["cause"], restarts
    assert restarts[0]["seconds"] > 0 and rows[-1]["job_restarts"] == 0
    return restarts[0]


def test_engine_killed_mid_broadcast(undisturbed, tmp_path):
    """The engine is frozen while the learner trains, so the weight sync starts without it and waits; it is killed
    while the learner and the other engine are in that sync."""
    def act():
        procs.wait_for(lambda: steps_done(tmp_path) >= 2, 300, 0.05, "step 2 done")
        procs.wait_for(lambda: procs.driver_in("train_step", "learner/group.py"), 120, what="a train step")
        pid = next(iter(procs.actor_pids("RolloutEngine")))
        os.kill(pid, signal.SIGSTOP)
        procs.wait_for(lambda: procs.driver_in("sync", "launch/weights.py"), 60, what="the weight sync")
        time.sleep(1.0)
        in_sync = procs.driver_in("sync", "launch/weights.py")
        os.kill(pid, signal.SIGKILL)
        return pid, in_sync

    rows, (killed, in_sync) = run_job(tmp_path, act)
    assert in_sync  # the driver was still waiting on the sync when the engine died
    assert_complete(rows, undisturbed)
    assert "died" in the_restart(rows, "weight sync", killed)["cause"]
    assert_replacement_follows_the_learner(rows)


def test_engine_killed_while_generating_ahead(undisturbed, tmp_path):
    """train.pipeline: one_step_off. The engine dies generating step k + 1 while the learner trains step k: its
    replacement waits for the learner's call to end, gets the weights of step k, and the prompts the dead engine held
    are generated again; every sample stays within one update of the learner."""
    def generating_ahead():
        if not procs.driver_in("train_step", "learner/group.py"):
            return None
        return next((pid for pid, t in procs.actor_pids("RolloutEngine").items() if ".generate" in t), None)

    def act():
        procs.wait_for(lambda: steps_done(tmp_path) >= 2, 300, 0.05, "step 2 done")
        pid = procs.wait_for(generating_ahead, 120, what="an engine generating while the learner trains")
        os.kill(pid, signal.SIGKILL)
        return pid

    rows, killed = run_job(tmp_path, act, "train.pipeline=one_step_off")
    assert_complete(rows, undisturbed, behind=1)
    assert all(r["staleness"] <= 1 for r in rows)
    assert "died" in the_restart(rows, "generate", killed)["cause"]
    assert_replacement_follows_the_learner(rows)


def test_learner_killed_resumes_from_checkpoint_in_the_same_job(undisturbed, tmp_path):
    def act():
        procs.wait_for(lambda: steps_done(tmp_path) >= 5, 300, 0.05, "step 5 done")
        procs.wait_for(lambda: procs.driver_in("train_step", "learner/group.py"), 120, what="step 6's train step")
        pid = next(iter(procs.actor_pids("LearnerWorker")))
        os.kill(pid, signal.SIGKILL)
        return pid

    rows, killed = run_job(tmp_path, act)
    assert_complete(rows, undisturbed)  # each step once in metrics.jsonl, on the same prompts
    last = rows[-1]
    assert last["job_restarts"] == 1 and last["engine_restarts"] == 0
    assert last["steps_recomputed"] == 2 <= 2  # resumed from step 4; steps 5 and 6 again: at most ckpt.every
    assert [r["step"] for r in rows if "job_recover_seconds" in r] == [5]
    assert not procs.alive(killed)


def test_restart_budget_ends_the_run_with_the_causes(ray_local, cpu_vllm, tmp_path):
    """rollout.max_restarts=0: the first engine failure stops the job with a clear error naming engine and cause."""
    from rollout.group import EngineRestartsExhausted

    def act():
        pid = procs.wait_for(engine_generating, 300, what="an engine generating")
        os.kill(pid, signal.SIGKILL)
        return pid

    saboteur = Saboteur(act)
    saboteur.start()
    cfg = load_config("toy_tiny_cpu.yaml", ARGS + [f"train.output_dir={tmp_path}", "rollout.max_restarts=0"])
    with pytest.raises(EngineRestartsExhausted, match=r"engine \d \(pid \d+ .*\) died .* during generate.*"
                                                      r"rollout.max_restarts=0"):
        train(cfg)
    saboteur.join(timeout=10)
    assert saboteur.error is None
    assert procs.wait_for(lambda: not procs.actor_pids("RolloutEngine"), 30, 0.5, "engines gone")



def test_killing_an_engine_kills_its_stuck_workers_too(ray_local):
    """`ray.kill` of a hung actor (SIGSTOPped) ends its process only: a child whose main thread is stuck (here
    SIGSTOPped too, as a TP worker inside a CUDA or NCCL call) outlives it and keeps its GPU memory. `kill_trees`
    (what EngineGroup's restart and shutdown call) leaves no process of the tree, within its bound."""
    import ray

    from core.reap import kill_trees

    class Forker:
        """An actor with a worker process of its own, as a TP > 1 engine has (vLLM's `mp` executor)."""

        def __init__(self):
            import subprocess
            import sys

            # its own session: no signal to the actor's process group reaches it, as a stuck TP worker
            self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                          start_new_session=True)

        def info(self) -> dict:
            from core.reap import process_tree

            return process_tree()

    actor = ray.remote(Forker).options(num_cpus=0).remote()
    info = ray.get(actor.info.remote(), timeout=60)
    assert info["tree"][0][0] == info["pid"] and len(info["tree"]) == 2, info
    child = info["tree"][1][0]
    os.kill(child, signal.SIGSTOP)
    os.kill(info["pid"], signal.SIGSTOP)  # a hung engine: Ray's own clean-up of a worker's children cannot run
    ray.kill(actor, no_restart=True)  # what a replacement did before: the actor goes, its stuck child stays
    assert procs.wait_for(lambda: not procs.alive(info["pid"]), 30)
    assert procs.alive(child), "the stopped child died with its actor: this test would show nothing"
    start = time.monotonic()
    kill_trees([(actor, info)], timeout_s=20)
    assert not procs.alive(child) and not procs.alive(info["pid"])
    assert time.monotonic() - start < 20


ENVS = os.path.join(os.path.dirname(__file__), "envs.py")
# tests/envs.py:Scripted answers every turn; every turn stops at its first character, so trajectories are short
MULTITURN = [f"env.name={ENVS}:Scripted", "env.max_turns=2", "env.max_observation_tokens=8",
             "env.stop=[" + ",".join(repr(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789 .,") + "]"]


@pytest.fixture(scope="module")
def undisturbed_multiturn(ray_local, cpu_vllm, tmp_path_factory):
    out = tmp_path_factory.mktemp("undisturbed_multiturn")
    rows, _ = run_job(out, None, *MULTITURN, f"eval.every={STEPS}", "eval.num_examples=4")
    return rows, out


def test_a_multiturn_job_trains_on_its_trajectories(undisturbed_multiturn):
    """The loop with an environment: rollouts of two-turn trajectories, scored, trained on and evaluated, with the
    multi-turn numbers logged."""
    rows, out = undisturbed_multiturn
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and any("loss" in r for r in rows)
    for r in rows:
        assert 1 <= r["env/turns"] <= 2 and r["env/env_tokens"] > 0 and 0 < r["env/model_token_frac"] < 1, r
        assert r["train_tokens"] < r["samples"] * 100 and r["completion_len"] <= 2 * 16
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, STEPS] and evals[-1]["eval/env/turns"] >= 1


def test_engine_killed_mid_multiturn_step_then_stopped_and_resumed(undisturbed_multiturn, tmp_path):
    """kill -9 of an engine while it generates step 3's trajectories (its environment pool's processes go with it);
    the run stops after step 5 (train.stop_after) and a second run resumes it. Every step once, on the undisturbed
    multi-turn run's prompts, with all their groups; one restart, and the replacement follows the learner.
    (Single-turn engine kills mid-generate: test_engine_killed_while_generating_ahead, the restart-budget test.)"""
    def act():
        procs.wait_for(lambda: steps_done(tmp_path) >= 2, 300, 0.05, "step 2 done")
        pid = procs.wait_for(engine_generating, 120, what="an engine generating")
        tree = procs.descendants(pid)
        os.kill(pid, signal.SIGKILL)
        return pid, tree

    first, (killed, tree) = run_job(tmp_path, act, *MULTITURN, "train.stop_after=5")
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    assert_replacement_follows_the_learner(first)
    assert tree, "the engine had no environment processes: the check below would show nothing"
    assert procs.wait_for(lambda: not any(procs.alive(p) for p in tree), 30, 0.5, "the engine's processes gone")
    rows, _ = run_job(tmp_path, None, *MULTITURN)
    assert_complete(rows, undisturbed_multiturn[0])
    restarts = restarts_of(rows)
    assert len(restarts) == 1 and restarts[0]["phase"] == "generate" and f"pid {killed}" in restarts[0]["cause"]
    assert "died" in restarts[0]["cause"] and all(r["env/turns"] >= 1 for r in rows)
