"""GRPO on GSM8K, or on any task a config describes (`configs/math_qwen2.5_0.5b.yaml`; README "Your own task"):
learner (DeepSpeed) and rollout engines (vLLM) as Ray actors.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/gsm8k.py --config configs/gsm8k_qwen2.5_0.5b.yaml [key.sub=value ...]

Run directly (`python launch/gsm8k.py ...`) it starts a local Ray cluster. Without --config it picks
`gsm8k_qwen2.5_0.5b.yaml` when this machine sees a GPU and `mawps_python_smollm2_cpu.yaml` (word problems with the
built-in Python tool) otherwise.
`--dry-run` prints the resolved config and exits; `--resume` insists on continuing from the latest checkpoint in
train.output_dir (which is also what happens by default when one is there).

Exit codes: `launch/exits.py` (0 done, 1 failed, 2 nothing trained: the config, cluster or output dir cannot be
used, 75 stopped by a signal after writing a checkpoint: submit the same command again to continue). The process
`ray job submit` starts watches a child that drives the job, and starts it again if it is killed or crashes
(`launch/driver.py`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir, under `ray job submit`

from launch import driver, exits  # noqa: E402
from launch.config import ConfigError, dump_config, load_config  # noqa: E402

GPU_PRESET, CPU_PRESET = "gsm8k_qwen2.5_0.5b.yaml", "mawps_python_smollm2_cpu.yaml"


def default_preset() -> str:
    import torch

    return GPU_PRESET if torch.cuda.is_available() else CPU_PRESET


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"a preset in configs/ or a YAML path (default: {CPU_PRESET} without a GPU, "
                                    f"{GPU_PRESET} with one)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="fail unless a checkpoint to resume from exists")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[rlvr] %(message)s", stream=sys.stdout, force=True)
    preset = args.config or default_preset()
    try:
        cfg = load_config(preset, args.overrides + (["train.resume=must"] if args.resume else []))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exits.UNUSABLE
    if args.dry_run:
        print(f"# resolved from {preset}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""))
        print(dump_config(cfg))
        return 0
    if not driver.is_driver():  # this process watches; a child process drives the job (`launch.driver`)
        return driver.watch(sys.argv[1:] if argv is None else list(argv), cfg.train.max_restarts)
    print(f"[rlvr] config {preset}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""), flush=True)
    from launch.train import train

    return exits.run_job(lambda: train(cfg))


if __name__ == "__main__":
    sys.exit(main())
