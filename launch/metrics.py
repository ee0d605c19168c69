"""Where the numbers go: `metrics.jsonl` and TensorBoard always, W&B when `log.wandb_project` is set, and at the
end a PNG of the curves plus a one-screen summary."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsNotWritten(RuntimeError):
    """metrics.jsonl could not be written (no space, read-only, quota): the run stops, with the file as it was."""


class MetricsLog:
    """metrics.jsonl holds whole lines only: a line that cannot be written in full is cut off again and the run
    stops (`MetricsNotWritten`), and the file is rewritten on resume under another name, then renamed."""

    def __init__(self, output_dir: Path, cfg, start_step: int = 0):
        self.path = output_dir / "metrics.jsonl"
        # On resume drop lines past the checkpoint, so each step appears once.
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step] if start_step else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise MetricsNotWritten(f"cannot rewrite {self.path} on resume: {err}; it is left as it was") from err
        self.tb = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if cfg.log.wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("log.wandb_project is set but wandb is not installed: pip install wandb") from err
            self.wandb = wandb.init(project=cfg.log.wandb_project, config=cfg.model_dump(mode="json"),
                                    dir=str(output_dir), resume="allow")

    def log(self, step: int, metrics: dict, extra: dict | None = None) -> None:
        """Numbers go everywhere; `extra` (e.g. the batch's example ids) only into metrics.jsonl."""
        row = {"step": step, **{k: v for k, v in metrics.items() if _is_number(v)}}
        line = (json.dumps({**row, **(extra or {})}) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise MetricsNotWritten(f"cannot open {self.path} to write step {step}'s line: {err}") from err
        try:
            whole = os.lseek(fd, 0, os.SEEK_END)
            left = memoryview(line)
            while left:  # a write may take part of the line, then fail
                left = left[os.write(fd, left):]
        except OSError as err:
            os.ftruncate(fd, whole)  # never half a line
            raise MetricsNotWritten(f"cannot write step {step}'s line to {self.path} ({len(line)} bytes): {err}; "
                                    f"the file keeps its earlier lines whole") from err
        finally:
            os.close(fd)
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        self.tb = self.wandb = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def named_eval_accuracies(evals: list[dict]) -> list[str]:
    """The accuracy keys of the eval.sets entries (eval/<name>/accuracy), sorted."""
    return sorted({k for r in evals for k in r if k.startswith("eval/") and k.endswith("/accuracy")
                   and k != "eval/accuracy"})


def plot_curves(rows: list[dict], png: Path, title: str) -> None:
    """Reward (total and per reward), accuracy and format rate, completion length, eval accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    for key in ["reward"] + sorted({k for r in train for k in r if k.startswith("reward/")}):
        axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=key, marker="." if len(steps) < 40 else None)
    axes[0].set_title("mean reward per sample")
    for key, label in (("accuracy", "train accuracy"), ("format_rate", "train format rate")):
        if train and key not in train[0]:
            continue
        axes[1].plot(steps, [r.get(key, float("nan")) for r in train], label=label)
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="eval accuracy")
        for key in named_eval_accuracies(evals):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "^:", label=f"eval accuracy, {key[5:-9]}")
        if all("eval/format_rate" in r for r in evals):
            axes[1].plot([r["step"] for r in evals], [r["eval/format_rate"] for r in evals], "s--",
                         label="eval format rate")
    axes[1].set_title("accuracy / format")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].plot(steps, [r.get("completion_len", float("nan")) for r in train], label="mean completion tokens")
    axes[2].set_title("completion length")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def mean_of(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def eval_trend(evals: list[dict], task: str = "the task") -> list[str]:
    """Eval accuracy at the start, the middle and the end of the run, per eval set, and the change in points."""
    if len(evals) < 2:
        return []
    picked = [evals[0], evals[len(evals) // 2], evals[-1]] if len(evals) > 2 else evals
    out = []
    for key in ["eval/accuracy"] + named_eval_accuracies(evals):
        prefix = key[:-len("accuracy")]
        if not all(key in r for r in picked):
            continue
        name = prefix[len("eval/"):].rstrip("/") or f"{task}'s eval set"
        n = picked[-1].get(prefix + "n")
        trend = "  →  ".join(f"step {r['step']} {r[key]:.3f}" for r in picked)
        change = 100 * (picked[-1][key] - picked[0][key])
        out.append(f"  accuracy on {name}{f' ({n} questions)' if n else ''}: {trend}  ({change:+.1f} points)")
    return out


def summary(rows: list[dict], output_dir: Path, wall_seconds: float, task: str = "the task") -> str:
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    k = min(5, max(1, len(train) // 2))
    lines = [f"run summary: {len(train)} steps in {wall_seconds / 60:.1f} min  ({output_dir})"]
    if train:
        lines.append(f"  reward      first {k} steps {mean_of(train[:k], 'reward'):.3f}  →  last {k} "
                     f"{mean_of(train[-k:], 'reward'):.3f}")
        for key in ("accuracy", "format_rate", "completion_len"):
            if key in train[0]:  # format_rate: only when the task names a format reward
                lines.append(f"  {key:<11} first {k} steps {mean_of(train[:k], key):.3f}  →  last {k} "
                             f"{mean_of(train[-k:], key):.3f}")
        # Mean over all steps; a phase a step did not run (no update, no eval) counts as 0 s.
        times = {t: sum(r.get(f"time/{t}", 0.0) for r in train) / len(train)
                 for t in ("generate", "reward", "train", "broadcast", "eval", "checkpoint", "other")}
        step_s = mean_of(train, "time/step")
        outside = step_s - times["generate"] - times["train"] - times["broadcast"]
        lines.append("  step time   " + "  ".join(f"{t} {v:.1f}s" for t, v in times.items()) +
                     f"  (mean step {step_s:.1f}s; outside generate/train/broadcast {100 * outside / step_s:.1f}%)")
    if evals:
        lines.append("  eval (the task's accuracy and format rewards): " + ",  ".join(
            f"step {r['step']}: accuracy {r['eval/accuracy']:.3f}" +
            (f" format {r['eval/format_rate']:.3f}" if "eval/format_rate" in r else "") for r in evals))
        lines += eval_trend(evals, task)
    lines.append(f"  files: metrics.jsonl, tensorboard/, curves.png, checkpoints/ under {output_dir}")
    return "\n".join(lines)
