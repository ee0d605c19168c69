"""Multi-turn generation throughput ÷ single-turn, one engine, one run (target ≥ 0.8; printed as a ratio).

Both sides run on one `RolloutEngine` built in this process (no Ray: the engine's own code, not its actor wrapper),
on the same prompts with the same number of samples:

- single-turn: `RolloutEngine.generate`, completions of `--max-tokens` tokens;
- multi-turn, for each of `--shapes` (TURNSxENV_TOKENS): `RolloutEngine._trajectories` (what
  `RolloutEngine.generate` runs with an environment: the loop of `rollout.multiturn` on the engine's environment
  pool), TURNS model turns of ~max_tokens / TURNS tokens each, every turn answered by `Echo` (below) with
  ENV_TOKENS environment tokens after `--env-ms` milliseconds.

The figure is model tokens per second (environment tokens not counted) of each, over the same number of model
tokens (± the few a stop string overshoots a turn's minimum). A turn ends on a stop string once it has its minimum
length (`min_tokens`), so turn lengths, and so the work, are fixed rather than left to a random model.

    .venv/bin/python bench/multiturn.py [--prompts 8 --n 16 --max-tokens 128 --shapes 2x10,4x8,4x16 --block-size 32]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo (pool processes too)
from rollout.env import Reply  # noqa: E402

STOP = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_'\"()[]{}<>/\\|=+*&%$#@")


class Echo:
    """An environment that answers every turn with `ids` after `ms` milliseconds (a tool's latency)."""

    def __init__(self, ids: list[int], ms: float = 0.0):
        self.ids, self.ms = ids, ms

    def step(self, row, turns):
        if self.ms:
            time.sleep(self.ms / 1000)
        return Reply(list(self.ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the rollout bench's random 25M Qwen2)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128, help="model tokens per sample, over all its turns")
    ap.add_argument("--shapes", default="2x10,4x8,4x16",
                    help="multi-turn shapes, TURNSxENV_TOKENS (environment tokens a turn), comma-separated; 2x10 is "
                         "the CPU Python-tool preset's (2 turns, a ```output block of one number is 8-10 tokens)")
    ap.add_argument("--env-ms", type=float, default=0.0, help="each environment call's latency")
    ap.add_argument("--workers", type=int, default=2, help="env.workers: the environment pool's processes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32, help="rollout.block_size (the Python-tool preset's)")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    os.environ.update(OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0", CUDA_VISIBLE_DEVICES="")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common
    import torch
    from vllm import SamplingParams

    from core.config import EnvConfig
    from rollout.engine import RolloutEngine

    torch.set_num_threads(args.threads)
    model = args.model or common.bench_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (int(k),), generator=g).tolist()
               for k in torch.randint(20, 80, (args.prompts,), generator=g)]
    window = 80 + args.max_tokens + max(turns * (obs + 8) for turns, obs in shapes)
    engine = RolloutEngine(model, "cpu", dtype="float32", max_model_len=window, cpu_kv_cache_gb=1.0,
                           block_size=args.block_size)
    rows = [{} for _ in prompts]

    def single(seed: int) -> dict:
        out = engine.generate(prompts, args.n, temperature=1.0, max_tokens=args.max_tokens, seed=seed)
        return {"tokens": sum(s.model_tokens for group in out for s in group)}

    def multi(shape: tuple[int, int]):
        turns, obs = shape
        per_turn = args.max_tokens // turns
        env = EnvConfig(name=f"{os.path.abspath(__file__)}:Echo", max_turns=turns, stop=STOP,
                        max_observation_tokens=obs, workers=args.workers, args={"ids": [11] * obs, "ms": args.env_ms})
        turn = SamplingParams(temperature=1.0, max_tokens=per_turn + 8, min_tokens=per_turn - 1, stop=STOP,
                              include_stop_str_in_output=True, logprobs=0)

        def run(seed: int) -> dict:
            out = engine._trajectories(prompts, rows, turn, args.n, env, seed)  # generate's, with a turn minimum
            samples = [s for group in out for s in group]
            return {"tokens": sum(s.model_tokens for s in samples),
                    "turns": sum(s.env["turns"] for s in samples) / len(samples),
                    "failed": sum(s.env.get("env_failed", 0.0) for s in samples)}
        return run

    single(0)  # warm-up: compiled kernels
    figures = {}
    for shape in shapes:  # each shape against single-turn runs alternated with it (a noisy machine's slower stretch
        run = multi(shape)  # falls on both); its environment pool started by the warm-up, outside the timing
        run(0)
        figures[shape] = f = {"single": [0, 0.0], "multi": [0, 0.0]}
        for r in range(args.rounds):
            for name, fn in (("single", single), ("multi", run)):
                start = time.perf_counter()
                got = fn(r + 1)
                f[name][1] += time.perf_counter() - start
                f[name][0] += got.pop("tokens")
                f.update(got)
    engine.env_pool.close()
    print("| mode | model tokens | seconds | model tok/s | single-turn beside it (tokens, s, tok/s) | ratio |\n"
          "|---|---|---|---|---|---|")
    ratios = {}
    for (turns, obs), f in figures.items():
        (st, st_s), (mt, mt_s) = f["single"], f["multi"]
        ratios[turns, obs] = (mt / mt_s) / (st / st_s)
        print(f"| multi-turn ({turns} turns, {f['turns']:.2f} made, {obs} env tokens a turn, {args.env_ms:g} ms env) "
              f"| {mt} | {mt_s:.2f} | {mt / mt_s:.1f} | {st}, {st_s:.2f}, {st / st_s:.1f} | {ratios[turns, obs]:.3f} |")
    print(f"failed environment calls: {sum(f['failed'] for f in figures.values()):g}")
    for (turns, obs), ratio in ratios.items():
        print(f"RATIO multi-turn {turns}x{obs} / single-turn model tok/s: {ratio:.3f} (target >= 0.8)")


if __name__ == "__main__":
    main()
