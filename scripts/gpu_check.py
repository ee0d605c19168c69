"""The GPU check, in tiers that fit a lent GPU's 15 minutes (docs/gpu.md has the call sequence and its budget).

    python scripts/gpu_check.py kit                    here: gpu_kit/tier1/ (DeepSpeed's wheel + what it needs)
    python scripts/gpu_check.py tier1 [--device D]     the learner path without vLLM or Ray: plain processes
    python scripts/gpu_check.py tier2 [--device D] [--stages tests,job,bench] [-k EXPR]
                                                       vLLM: tests/test_gpu.py, the job, bench/gpu.py (after
                                                       scripts/gpu_kit.sh has installed vLLM and Ray)

Each tier writes `gpu_check.json` ({"tier", "device", "checks": {name: {"ok", "seconds", ...figures}}}) into
`--out` (default $OUT, the folder the device tool brings back) and exits 1 if a check failed. CI runs both tiers
with `--device cpu` (tests/test_gpu_check.py): the same functions on gloo, at the same tiny sizes.

Tier 1 runs DeepSpeed's ranks (`learner.worker.LearnerWorker`, the class Ray wraps in the job) as plain
processes, each seeing its own GPU as device 0 as under Ray: the image lacks Ray, and Ray's wheel alone is larger
than one call may carry. A tiny random Qwen2 is built on the device; nothing model-sized travels.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from plain_procs import Proc, gather  # the learner ranks and the receiver as plain processes

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
KIT = ROOT / "gpu_kit" / "tier1"
# What tier 1 needs beside the GPU image's packages (torch, transformers, numpy, psutil, ninja, py-cpuinfo, ...).
TIER1_WHEELS = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]


# ---- tier 1 ------------------------------------------------------------------------------------------------------

class Checks:
    """Named checks with their figures; a check that raises is a failure with its error, and the rest still run."""

    def __init__(self, tier: str, device: str, out: Path):
        self.out = out
        self.report = {"tier": tier, "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": {}}

    def run(self, name: str, fn, *args) -> dict | None:
        start = time.perf_counter()
        try:
            figures = fn(*args) or {}
            entry = {"ok": not figures.pop("skipped", None), **figures}
            if "reason" in figures:
                entry["ok"] = None  # skipped, with its reason: neither a pass nor a failure
        except Exception as err:  # noqa: BLE001 - recorded; the other checks still run
            entry = {"ok": False, "error": f"{type(err).__name__}: {err}"[:4000]}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.report["checks"][name] = entry
        print(f"[gpu_check] {name}: {entry}", flush=True)
        self.write(quiet=True)  # after every check: a call cut off at its time limit still brings back what ran
        return entry

    def write(self, quiet: bool = False) -> bool:
        out = self.out
        checks = self.report["checks"].values()
        self.report["passed"] = sum(c["ok"] is True for c in checks)
        self.report["failed"] = sum(c["ok"] is False for c in checks)
        self.report["skipped"] = sum(c["ok"] is None for c in checks)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "gpu_check.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old[self.report["tier"]] = self.report  # tier 1 and tier 2 of one sitting side by side
        path.write_text(json.dumps(old, indent=1))
        if not quiet:
            print(f"[gpu_check] {self.report['tier']}: {self.report['passed']} passed, {self.report['failed']} failed, "
                  f"{self.report['skipped']} skipped → {path}", flush=True)
        return self.report["failed"] == 0


def check_ws1_group(device: str) -> dict:
    """A weight group of one member (the only NCCL group one GPU holds): open, two syncs, abort, reopen, two syncs.
    With one member nothing is received: it fails by raising or hanging, which is what it checks (construction in
    blocking-wait mode, the communicator's creation at open, an abort that leaves nothing blocking the next group)."""
    import torch

    from core import weight_sync

    backend = weight_sync.BACKEND_FOR_DEVICE[device]
    tensors = {"w": torch.randn(256, 128, device=device), "b": torch.randn(128, device=device)}
    plan = weight_sync.plan_buckets([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], 64 << 10)
    syncs = 0
    for _ in range(2):
        group = weight_sync.open_group(backend, "127.0.0.1", weight_sync.free_port("127.0.0.1"), 1, 0, 60)
        buffers = weight_sync.RotatingBuffers(plan, device)
        for version in (1, 2):
            sent = weight_sync.send(group, plan, version, (weight_sync.pack(b, tensors, device, out=buffers.next(b))
                                                           for b in plan), device)
            if sent != sum(b.nbytes for b in plan):
                raise AssertionError(f"sync v{version} sent {sent} bytes, the plan holds {sum(b.nbytes for b in plan)}")
            syncs += 1
        weight_sync.close_group(group)
        if group.pg is not None:
            raise AssertionError("close_group left the process group in place")
    return {"backend": backend, "syncs": syncs, "buckets": len(plan)}


def gpu_env(index: int) -> dict:
    """The environment that shows a process only this machine's GPU `index` (through any mask already set), as
    device 0, as Ray does for an actor."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[index] if visible else str(index)}


def learner_ranks(model: str, device: str, stage: int, ranks: int, dtype: str = "bfloat16", micro: int = 4,
                  layout: str = "auto") -> list[Proc]:
    """`ranks` LearnerWorker processes joined in one DeepSpeed group (CUDA: GPU r each, as device 0)."""
    from core import weight_sync
    from core.config import GRPOConfig, LearnerConfig
    from learner.worker import worker_env
    from reference import CLIP, LR

    cfg = LearnerConfig(num_workers=ranks, zero_stage=stage, lr=LR, betas=(0.9, 0.99), max_grad_norm=CLIP,
                        micro_batch_size=micro, bucket_mb=1, layout=layout)
    procs = []
    for r in range(ranks):
        env = worker_env(device, 1)
        if device == "cuda":
            env.update(gpu_env(r))
        procs.append(Proc("learner.worker", "LearnerWorker", (r, ranks), env))
    master = ("127.0.0.1", weight_sync.free_port("127.0.0.1"))
    gather([p.call("setup", master, model, device, cfg, GRPOConfig(), 10, dtype, 0, 300)
            for p in procs])
    return procs


def check_zero_step(model: str, device: str, stage: int, ranks: int) -> dict:
    """A ZeRO-`stage` bf16 step (fp32 master weights) against plain fp32 torch, and the learner's chunked
    logprobs against transformers' full-vocabulary log softmax."""
    import torch

    from reference import T, load, make_batch, make_groups, plain_logprobs, reference_step, state, step_agreement

    procs = learner_ranks(model, device, stage, ranks)
    try:
        samples = make_batch(0, n=8) + make_groups(0)  # distinct prompts, and groups that share theirs
        ref_loss, ref_norm, ref_weights = reference_step(model, samples, device)
        from learner.shards import make_shards

        shards = make_shards(samples, ranks, 4, 1, T)
        metrics = gather([p.call("train_step", s) for p, s in zip(procs, shards)])[0]
        weights = gather([p.call("full_state_dict") for p in procs])[0]
        agree, moved = step_agreement(state(load(model)), ref_weights, weights)
        s = samples[0]
        scored = gather([p.call("score", s.prompt_ids, s.completion_ids, T) for p in procs])[0]
        hf = load(model, device)
        hf.load_state_dict(weights)
        with torch.no_grad():
            plain = plain_logprobs(hf, s).cpu()
        gap = (torch.tensor(scored["logprobs"]) - plain).abs().max().item()
    finally:
        for p in procs:
            p.close()
    ok = (abs(metrics.loss - ref_loss) <= 0.02 * abs(ref_loss) + 1e-3 and abs(metrics.grad_norm - ref_norm)
          <= 0.05 * ref_norm and moved > 1000 and agree / moved > 0.97 and gap < 0.05)
    figures = {"loss": metrics.loss, "ref_loss": ref_loss, "grad_norm": metrics.grad_norm, "ref_norm": ref_norm,
               "step_agreement": round(agree / max(moved, 1), 4), "chunked_logprob_max_gap": gap, "ranks": ranks}
    if not ok:
        raise AssertionError(f"bf16 ZeRO-{stage} step off the fp32 reference: {figures}")
    return figures


def check_weight_group(model: str, device: str, gpus: int) -> dict:
    """Learner rank 0 → a plain-torch receiver on the device's backend (gloo with one GPU): open, two syncs with a
    train step between (plan and buffers reused), abort on both, reopen on a fresh port, a third sync; each sync's
    tensors are the learner's (checksums)."""
    import torch

    from core import weight_sync
    from reference import T, make_batch

    # NCCL refuses two ranks on one GPU: there, gloo carries the CUDA tensors (as scripts/one_gpu_job.py does)
    backend = weight_sync.BACKEND_FOR_DEVICE[device] if device == "cpu" or gpus >= 2 else "gloo"
    (learner,) = learner_ranks(model, device, 2, 1)
    env = gpu_env(1 if gpus >= 2 else 0) if device == "cuda" else {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    receiver = Proc("plain_procs", "Receiver", (device,), env)
    seconds = []
    try:
        from learner.shards import make_shards

        plan = learner.call("weight_plan").result()
        for attempt, versions in enumerate(((1, 2), (3,))):
            port = weight_sync.free_port("127.0.0.1")
            gather([learner.call("open_weight_group", backend, "127.0.0.1", port, 2, 60),
                    receiver.call("open", backend, "127.0.0.1", port, 2, 1, 60, plan)])
            for version in versions:
                learner.call("train_step", make_shards(make_batch(version, n=4), 1, 4, 1, T)[0]).result()
                start = time.perf_counter()
                sent, got = gather([learner.call("broadcast_weights", version), receiver.call("receive", version)])
                seconds.append(time.perf_counter() - start)
                want = {k: v.to(torch.bfloat16).double().sum().item()
                        for k, v in learner.call("full_state_dict").result().items() if k != "lm_head.weight"}
                bad = [k for k in want if abs(want[k] - got[k]) > 1e-6 * max(1.0, abs(want[k]))]
                if got.keys() != want.keys() or bad:
                    raise AssertionError(f"sync v{version}: tensors differ from the learner's: {bad[:3]}")
            gather([learner.call("close_weight_group"), receiver.call("close")])  # abort, then a fresh group
    finally:
        learner.close(), receiver.close()
    return {"backend": backend, "syncs": len(seconds), "sync_seconds": [round(s, 4) for s in seconds],
            "bytes": sent["bytes"]}


def check_learner_speed(model_path: str, device: str) -> dict:
    """Learner tokens/s through forward+backward and peak memory per `learner.layout`, ZeRO-2 bf16, one rank, on
    GSM8K-shaped groups (on a GPU the Qwen2.5-0.5B-shaped model, groups of 16, a group per micro-batch as the GPU
    preset); on a GPU the padded peak is held to `learner.memory`'s estimate, which sizes the GPU presets (CPU: the
    process's RSS, not comparable)."""
    from transformers import AutoConfig

    from learner import memory
    from learner.shards import make_shards
    from reference import gsm8k_shaped

    (p, shortest, c), n, micro = ((170, 40, 128), 16, 16) if device == "cuda" else ((48, 8, 32), 4, 4)
    batch = gsm8k_shaped(2, n, p, shortest, c)
    shard = make_shards(batch, 1, micro, 1, 1.0)[0]
    tokens = sum(s.num_tokens for s in batch)
    completion = sum(len(s.completion_ids) for s in batch)
    figures = {"rows": f"2 groups of {n}, prompts {p}, completions {shortest}-{c}, micro-batch {micro}"}
    peaks = {}
    for layout in ("padded", "shared"):
        (learner,) = learner_ranks(model_path, device, 2, 1, micro=micro, layout=layout)
        try:
            learner.call("train_step", shard).result()
            times = []
            for _ in range(2):
                start = time.perf_counter()
                peaks[layout] = learner.call("train_step", shard).result().peak_memory_bytes
                times.append(time.perf_counter() - start)
        finally:
            learner.close()
        figures[layout] = {"tokens_per_s": round(tokens / min(times)),
                           "completion_tokens_per_s": round(completion / min(times)),
                           "peak_memory_gib": round(peaks[layout] / 2**30, 3)}
    est = memory.from_hf_config(AutoConfig.from_pretrained(model_path).to_dict(), micro_batch=micro, seq_len=p + c)
    peak = peaks["padded"]
    figures.update(tokens_per_s=figures["padded"]["tokens_per_s"],
                   shared_over_padded=round(figures["shared"]["completion_tokens_per_s"]
                                            / figures["padded"]["completion_tokens_per_s"], 3),
                   estimate_gib=round(est["total"] / 2**30, 3), peak_over_estimate=round(peak / est["total"], 3),
                   estimate=memory.summary(est))
    if device == "cuda" and not 0.5 <= peak / est["total"] <= 1.5:
        raise AssertionError(f"peak memory {peak / 2**30:.2f} GiB is far from learner/memory.py's estimate "
                             f"{est['total'] / 2**30:.2f} GiB: the GPU presets' sizes rest on it ({figures})")
    return figures


def tier1(device: str, out: Path) -> bool:
    import torch

    from core.models import build_qwen25_05b_shape, build_tiny_qwen2

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    checks = Checks("tier1", device, out)
    checks.report.update(torch=torch.__version__, gpus=gpus,
                         gpu=torch.cuda.get_device_name(0) if gpus else None)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_qwen2(Path(tmp) / "tiny-qwen2"))
        checks.run("ws1_group_open_sync_abort_reopen", check_ws1_group, device)
        ranks = max(1, min(2, gpus))
        checks.run("zero2_bf16_step_and_chunked_logprobs", check_zero_step, model, device, 2, ranks)
        checks.run("zero3_bf16_step_and_chunked_logprobs", check_zero_step, model, device, 3, ranks)
        checks.run("weight_group_into_plain_receiver", check_weight_group, model, device, gpus)
        speed_model = model if device == "cpu" else str(build_qwen25_05b_shape(Path(tmp) / "qwen-shape", model))
        checks.run("learner_tokens_per_s_and_memory", check_learner_speed, speed_model, device)
    return checks.write()


# ---- tier 2 ------------------------------------------------------------------------------------------------------

def junit_checks(path: Path) -> dict[str, dict]:
    """pytest's junit XML → {test id: {"ok": True/False/None (skipped), "seconds", "reason"}}."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        entry = {"ok": True, "seconds": float(case.get("time", 0))}
        for tag, ok in (("failure", False), ("error", False), ("skipped", None)):
            found = case.find(tag)
            if found is not None:
                entry.update(ok=ok, reason=(found.get("message") or "")[:2000])
        out[name] = entry
    return out


def tier2(device: str, out: Path, stages: list[str], select: str | None, limit_s: float = 560,
          per_test_s: int = 300) -> bool:
    """`limit_s` bounds each stage (a device call has 600 s), `per_test_s` each test of tests/test_gpu.py."""
    checks = Checks("tier2", device, out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if "tests" in stages:
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / "junit.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
                   "tests/test_gpu.py", *(["-k", select] if select else [])]
            start = time.perf_counter()
            cmd[4:4] = [f"--timeout={per_test_s}"]  # each test ends in time, so pytest writes its report
            try:
                run = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=limit_s)
                text = run.stdout + run.stderr
            except subprocess.TimeoutExpired as err:
                partial = err.stdout or ""
                text = (partial.decode(errors="replace") if isinstance(partial, bytes) else partial) + \
                    "\n[tier 2 tests: stopped at the time limit]"
            print(text[-6000:], flush=True)
            if not xml.exists():
                checks.report["checks"]["tests"] = {"ok": False, "error": text[-6000:],
                                                    "seconds": round(time.perf_counter() - start, 2)}
                checks.write()
            else:
                checks.report["checks"].update({f"test_gpu::{k.partition('::')[2]}": v
                                                for k, v in junit_checks(xml).items()})
                checks.write()
    if "bench" in stages:
        def bench() -> dict:
            run = subprocess.run([sys.executable, "bench/gpu.py", "--device", device], cwd=ROOT, env=env, text=True,
                                 capture_output=True, timeout=limit_s)
            lines = [line for line in run.stdout.splitlines()
                     if re.match(r"(generation|weight sync|learner)", line)]
            if run.returncode:
                raise RuntimeError(run.stderr[-3000:])
            return {"lines": lines}
        checks.run("bench_gpu", bench)
    if "job" in stages:
        def job() -> dict:
            run = subprocess.run([sys.executable, "scripts/gpu_kit.py", "run", "job"], cwd=ROOT, env=env, text=True,
                                 capture_output=True, timeout=limit_s)
            if run.returncode:
                raise RuntimeError(run.stdout[-3000:] + run.stderr[-3000:])
            return {"summary": run.stdout[-3000:]}
        checks.run("job_9_minutes", job)
    return checks.write()


# ---- the kit for tier 1 ------------------------------------------------------------------------------------------

def kit(folder: Path, python: str) -> None:
    """`folder` (gpu_kit/tier1/): DeepSpeed's wheel (built from its sdist) and the small wheels tier 1 needs, for
    Python `python` (the GPU image's 3.12) on manylinux x86_64, at the versions this checkout's venv runs. A few
    MiB: one device call carries them."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pins = [f"{n}=={version(n)}" for n in TIER1_WHEELS]
    abi = "cp" + python.replace(".", "")
    platform = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi,
                "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *platform, *pins],
                   env=env, check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder),
                    f"deepspeed=={version('deepspeed')}"], env=env, check=True)
    files = sorted(folder.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    print(f"[gpu_check] {folder} (Python {python}): {len(files)} wheels, {total / 2**20:.1f} MiB:")
    for f in files:
        print(f"  {f.name} {f.stat().st_size / 2**20:.2f} MiB")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tier", choices=["kit", "tier1", "tier2"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu_check_out"))
    parser.add_argument("--stages", default="tests,job,bench")
    parser.add_argument("--kit-dir", default=str(KIT), help="kit: where the wheels go")
    parser.add_argument("--python", default="3.12", help="kit: the GPU image's Python version")
    parser.add_argument("-k", dest="select", default=None, help="tier 2: pytest -k expression for tests/test_gpu.py")
    args = parser.parse_args(argv)
    if args.tier == "kit":
        kit(Path(args.kit_dir), args.python)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tier == "tier1":
        return 0 if tier1(device, Path(args.out)) else 1
    return 0 if tier2(device, Path(args.out), args.stages.split(","), args.select) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
