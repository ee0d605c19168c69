"""Evaluate a model on a task's eval sets, on the same engines and with the same code as training's eval.

    python launch/evaluate.py --config toy_tiny_cpu.yaml --model runs/toy/final_model
    python launch/evaluate.py --config gsm8k_qwen2.5_0.5b.yaml --checkpoint runs/gsm8k/checkpoints/step-000200
    ray job submit --working-dir . -- python launch/evaluate.py --config ... --model Qwen/Qwen2.5-0.5B-Instruct

`--model` scores any Hugging Face model folder or hub id (default: the config's model.path). `--checkpoint` scores a
training checkpoint (a `step-*` folder, or a run's output dir for its latest one): the learner loads it and sends the
weights to the engines, exactly as training does before its own eval. The eval sets, sampling (eval.n,
eval.temperature) and rewards come from the config; key=value overrides work as for training. Prints one line per
eval set and the metrics as JSON, with the keys training writes to metrics.jsonl (`--output` also writes the JSON).

Exit codes: `launch/exits.py` (0 done, 1 failed, 2 the config, the model or the cluster cannot be used).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir, under `ray job submit`

from launch import exits  # noqa: E402
from launch.config import load_config  # noqa: E402

log = logging.getLogger("rlvr")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a preset in configs/ or a YAML path (the task and its eval sets)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a Hugging Face model folder or id (default: the config's model.path)")
    which.add_argument("--checkpoint", help="a training checkpoint folder (step-*), or a run's output dir")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def evaluate_model(cfg, checkpoint_dir: Path | None = None) -> dict:
    """Start engines (and, for a checkpoint, the learner) on the cluster, evaluate, tear everything down."""
    import ray
    from transformers import AutoTokenizer

    from core.models import resolve_model
    from launch import checkpoint
    from launch.batch import evaluate, load_eval_sets, make_scorer
    from launch.cluster import connect, detect_device
    from launch.actors import check_inputs, start_actors, stop_actors
    from launch.supervisor import Faults

    check_inputs(cfg)
    connect(cfg.train.ray_address)
    device = detect_device(cfg.train.device, cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.path))
    sets, scorer, faults = load_eval_sets(cfg, tokenizer), make_scorer(cfg), Faults()
    actors = start_actors(cfg, device, faults, learner_too=checkpoint_dir is not None)
    try:
        if checkpoint_dir is None:
            actors.engines.ready()
        else:
            actors.connect(cfg, device, sets[0].ids[0])
            actors.learners.load(str(checkpoint_dir))
            actors.channel.sync(checkpoint.read_state(checkpoint_dir)["step"])
        start = time.time()
        metrics = evaluate(actors.channel or actors.engines, sets, cfg, scorer)
        failed = {k: v for k, v in scorer.failures().items() if v}
        if failed:  # those calls scored 0: the numbers above are lower bounds
            log.warning(f"reward calls that failed and scored 0: {failed}")
            metrics.update(failed)
        log.info(f"evaluated {sum(len(s.ids) for s in sets)} questions × {cfg.eval.n} in {time.time() - start:.1f}s")
    finally:
        stop_actors(actors, faults)
        scorer.close()
        ray.shutdown()
    return metrics


def find_checkpoint(path: str) -> Path:
    from launch import checkpoint

    folder = Path(path).expanduser().resolve()
    if (folder / checkpoint.STATE_FILE).exists():
        return folder
    latest = checkpoint.latest_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"--checkpoint {path}: neither a complete checkpoint nor a run dir holding one")
    return latest


def format_lines(metrics: dict) -> list[str]:
    """One line per eval set: eval/... first, then eval/<name>/..."""
    sets: dict[str, list[str]] = {}
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        sets.setdefault(prefix, []).append(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")
    return [f"{prefix}: " + "  ".join(parts) for prefix, parts in sets.items()]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[rlvr] %(message)s", stream=sys.stdout, force=True)
    return exits.run_job(lambda: run(args))


def run(args) -> dict:
    ckpt = find_checkpoint(args.checkpoint) if args.checkpoint else None
    cfg = load_config(args.config, args.overrides + ([f"model.path={args.model}"] if args.model else []))
    print(f"[rlvr] eval-only: {ckpt or cfg.model.path} on {cfg.task.name} "
          f"({1 + len(cfg.eval.sets)} eval set(s), n={cfg.eval.n}, temperature={cfg.eval.temperature})", flush=True)
    metrics = evaluate_model(cfg, ckpt)
    for line in format_lines(metrics):
        print(line, flush=True)
    print("metrics " + json.dumps(metrics, sort_keys=True), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
