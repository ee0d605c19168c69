"""Base rates of a model on word-problem sets reachable offline: how often it is right and well formatted before any
training, greedy and sampled, with the prompt of a preset. A set whose accuracy is at its floor, or whose groups are
all right or all wrong, teaches GRPO nothing; this is how the CPU default's training set was chosen (README).

    python bench/base_rates.py                                   # the CPU default's model and prompt, 32 × 8 each
    python bench/base_rates.py --questions 64 --samples 16 --sets gsm8k,svamp
    python bench/base_rates.py --config gsm8k_qwen2.5_0.5b.yaml  # any preset; key=value overrides follow

Per set: greedy accuracy and format rate (one sample per question, the eval's numbers), then `--samples` samples per
question at the preset's rollout temperature: accuracy (mean@k), pass@k, mixed@k (the share of questions whose samples
differ in accuracy: the groups that carry a signal) and the format rate. The same engines and scoring as training's
eval (`launch.batch.evaluate`); the first `--questions` rows of each set's split.
"""
from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: F401 (the repo on sys.path)

from launch.config import EvalSet, load_config

# name → how its rows are read (an eval.sets entry; data.* fills what is left out: the prompt and rewards)
SETS = {
    "gsm8k": dict(source="offline:gsm8k", split="test", prompt_field="question", answer_field="answer",
                  answer_extract="gsm8k"),
    "gsm_hard": dict(source="offline:gsm_hard", prompt_field="input", answer_field="target", answer_extract="none"),
    "svamp": dict(source="offline:svamp", question_template="{Body} {Question}", answer_field="Answer",
                  answer_extract="none"),
    "asdiv": dict(source="offline:asdiv", question_template="{body} {question}", answer_field="answer",
                  answer_extract="number"),
    **{f"mawps_{part}": dict(source="offline:mawps", split=part, prompt_field="input", answer_field="target",
                             answer_extract="none") for part in ("singleop", "addsub", "multiarith", "singleeq")},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gsm8k_smollm2_cpu.yaml", help="the preset whose model and prompt are used")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    p.add_argument("--questions", type=int, default=32, help="questions per set (the first rows of its split)")
    p.add_argument("--samples", type=int, default=8, help="samples per question at the rollout temperature")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args()
    names = args.sets.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        p.error(f"unknown set(s) {unknown}; known: {list(SETS)}")

    import ray
    from transformers import AutoTokenizer

    from core.models import resolve_model
    from launch.actors import start_actors, stop_actors
    from launch.batch import evaluate, load_eval_sets, make_scorer
    from launch.cluster import connect, detect_device
    from launch.supervisor import Faults

    base = load_config(args.config, args.overrides + ["data.holdout=0"])
    sets = [EvalSet(name=n, num_examples=args.questions, **SETS[n]) for n in names]
    greedy = base.model_copy(update={"eval": base.eval.model_copy(update={"sets": sets, "n": 1, "temperature": 0.0})})
    sampled = base.model_copy(update={"eval": greedy.eval.model_copy(
        update={"n": args.samples, "temperature": base.rollout.temperature})})
    connect(base.train.ray_address)
    device = detect_device(base.train.device, base)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(base.model.path))
    prompt_sets = load_eval_sets(greedy, tokenizer)[1:]  # the preset's own test set is not one of the candidates
    scorer, faults = make_scorer(base), Faults()
    actors = start_actors(base, device, faults, learner_too=False)
    try:
        actors.engines.ready()
        start = time.time()
        g = evaluate(actors.engines, prompt_sets, greedy, scorer)
        s = evaluate(actors.engines, prompt_sets, sampled, scorer) if args.samples > 1 else {}
        seconds = time.time() - start
    finally:
        stop_actors(actors, faults)
        scorer.close()
        ray.shutdown()

    k, fmt = args.samples, "format_rate" if base.task.format else None
    print(f"\nbase rates: {base.model.path}, preset {args.config}, {args.questions} questions per set, greedy and "
          f"{k} samples at temperature {base.rollout.temperature}, max_tokens {base.rollout.max_tokens} "
          f"({seconds:.0f} s)\n")
    cols = ["set", "greedy acc", "greedy format"] + ([f"acc@{k}", f"pass@{k}", f"mixed@{k}", "format",
                                                      "tokens"] if k > 1 else [])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for n in names:
        row = [n, f"{g[f'eval/{n}/accuracy']:.3f}", f"{g.get(f'eval/{n}/{fmt}', float('nan')):.3f}"]
        if k > 1:
            row += [f"{s[f'eval/{n}/{key}']:.3f}" for key in ("accuracy", f"pass@{k}", f"mixed@{k}")]
            row += [f"{s.get(f'eval/{n}/{fmt}', float('nan')):.3f}", f"{s[f'eval/{n}/completion_len']:.0f}"]
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
