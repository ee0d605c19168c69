"""Pipeline benchmark, one run: the same CPU job trained with train.pipeline: sync, then one_step_off.

The engine and the learner get one compute thread each (rollout.threads=1, learner.threads=1), and each process is
pinned to a core of its own (engine: the last core, learner: the first), so on 2 cores the overlap is physical. The work (the toy preset's task on a random Qwen2 of hidden 256 and 4 layers, `--prompts`
× 8 samples of up to `--tokens` tokens) is sized so that generating a batch and training on it take similar time; the run prints both.

Per mode: the median over steps 3.. (steps 1-2 warm up) of the step time, and of the sync run's generate and
train phases. Then:
  async ÷ sync                          (target ≤ 0.7)
  async step ÷ max(generate, train)     (target ≤ 1.15; generate and train of the sync run, where they do not
                                          share the cores)

    .venv/bin/python bench/pipeline.py [--steps 10 --prompts 8 --tokens 224]
"""
import argparse
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import common

from launch.config import load_config
from launch.metrics import read_jsonl
from launch.train import train
from tests.procs import actor_pids


class Pinner(threading.Thread):
    """Keeps every thread of the engine processes on the last core and of the learner processes on the first."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.pinned = threading.Event(), set()

    def run(self):
        cores = sorted(os.sched_getaffinity(0))
        while not self.stop.wait(0.2):
            for cls, core in (("RolloutEngine", cores[-1]), ("LearnerWorker", cores[0])):
                for pid in actor_pids(cls):
                    for task in Path(f"/proc/{pid}/task").glob("*"):
                        try:
                            os.sched_setaffinity(int(task.name), {core})
                            self.pinned.add((cls, pid))
                        except OSError:  # a thread that just ended
                            pass


def run(mode: str, args, out: str) -> list[dict]:
    overrides = [f"model.path={common.bench_model(hidden=256, layers=4)}", "rollout.n=8",
                 f"rollout.max_tokens={args.tokens}", "rollout.threads=1", "learner.threads=1",
                 "learner.micro_batch_size=16", "learner.lr=1e-4",
                 f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}", "train.device=cpu",
                 f"train.output_dir={out}", f"train.pipeline={mode}", "eval.every=0", "ckpt.every=0",
                 "ckpt.export_hf=false", "log.sample_every=0", "log.tensorboard=false"]
    pinner = Pinner()
    pinner.start()
    try:
        train(load_config("toy_tiny_cpu.yaml", overrides))  # the toy task (digits reward) on a larger random model
    finally:
        pinner.stop.set()
    print(f"pinned: {sorted(pinner.pinned)}")
    return [r for r in read_jsonl(f"{out}/metrics.jsonl") if "reward" in r]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=224)
    args = parser.parse_args()
    common.start_ray(num_cpus=4)
    found = {}
    for mode in ("sync", "one_step_off"):
        with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{mode}-") as out:
            rows = run(mode, args, out)[2:]
        found[mode] = {"step": median(rows, "time/step"), "generate": median(rows, "time/generate"),
                       "train": median(rows, "time/train"), "broadcast": median(rows, "time/broadcast"),
                       "rollout": median(rows, "rollout_seconds"), "steps": len(rows)}
    sync, ahead = found["sync"], found["one_step_off"]
    for mode, f in found.items():
        print(f"{mode:>13}: step {f['step']:.2f}s  generate {f['generate']:.2f}s (waited for)  train "
              f"{f['train']:.2f}s  broadcast {f['broadcast']:.2f}s" +
              (f"  rollout {f['rollout']:.2f}s (in the background)" if mode != "sync" else "") +
              f"  [median of {f['steps']} steps]")
    bound = max(sync["generate"], sync["train"])
    print(f"sync generate ÷ train: {sync['generate'] / sync['train']:.2f} (the work is balanced near 1)")
    print(f"async ÷ sync: {ahead['step'] / sync['step']:.3f} (target ≤ 0.7)")
    print(f"async step ÷ max(generate, train): {ahead['step'] / bound:.3f} (target ≤ 1.15)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
