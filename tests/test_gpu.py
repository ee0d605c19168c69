"""The GPU path: vLLM engines on CUDA, NCCL weight broadcasts, DeepSpeed in bf16, a short job. Skipped without CUDA.

These run on a GPU machine (`scripts/gpu_kit.sh run` runs them there); on CPU CI they are skips with reasons.
NCCL refuses two ranks of one communicator on the same GPU, so an NCCL broadcast from a learner to an engine needs
a GPU for each: tests that need more GPUs than the machine has say so in their skip reason. On one GPU a gloo
broadcast still exercises the engine's receiving side on CUDA, and the job runs with learner and engine sharing
the GPU (scripts/one_gpu_job.py).
"""
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import weight_sync
from core.types import TrainSample
from launch.config import GRPOConfig, LearnerConfig, RolloutConfig
from learner.group import LearnerGroup
from reference import CLIP, LR, T, load, make_batch, reference_step, state
from rollout.group import EngineGroup

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(GPUS == 0, reason="no CUDA device: the GPU tests run on a GPU machine "
                                                   "(scripts/gpu_kit.sh run)")]
QUESTIONS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?",
             "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
             "How much did she earn?",
             "What is 17 times 23?"]


def needs_gpus(n: int, why: str):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} GPUs ({why}); this machine has {GPUS}")


@pytest.fixture(scope="session")
def cuda_vllm():
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.skip(f"the installed vLLM targets {current_platform.device_type}, not CUDA")
    import vllm

    return vllm.__version__


@pytest.fixture(scope="session")
def smollm2() -> str:
    """A real pretrained model (SmolLM2-135M-Instruct, head_dim 64): peaked distributions test logprobs harder
    than a random model's near-uniform ones."""
    from core.models import resolve_model

    return resolve_model("builtin:smollm2-135m-instruct")


def prompts(model_path: str) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
            for q in QUESTIONS]


def hf_logprobs(model, samples) -> torch.Tensor:
    """Teacher-forced log softmax(logits / T) of every sampled token, concatenated, in fp32 from `model`."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids], device="cuda")
            logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1].float() / T
            out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, len(s.prompt_ids):, None])[:, 0].cpu())
    return torch.cat(out)


def logprob_gaps(engine_samples, model_path: str, state_dict: dict | None = None) -> dict[str, float]:
    """Mean |engine − transformers| logprob of the engine's tokens against transformers in bf16 and in fp32."""
    engine = torch.tensor([lp for s in engine_samples for lp in s.logprobs])
    gaps = {}
    ref = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).cuda().eval()
        if state_dict is not None:
            model.load_state_dict(state_dict)
        ref[dtype] = hf_logprobs(model, engine_samples)
        del model
    gaps["engine_vs_hf_bf16"] = (engine - ref[torch.bfloat16]).abs().mean().item()
    gaps["engine_vs_hf_fp32"] = (engine - ref[torch.float32]).abs().mean().item()
    gaps["hf_bf16_vs_hf_fp32"] = (ref[torch.bfloat16] - ref[torch.float32]).abs().mean().item()
    return gaps


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


def perturbed_state(model_path: str, scale: float = 0.3, seed: int = 1) -> dict:
    """The model's weights plus noise of `scale` × each tensor's std: a different model with the same shapes."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.float().std() * scale)
    return {k: v.clone() for k, v in model.state_dict().items()}


class TestOneEngine:
    """One bf16 engine with CUDA graphs (as the GPU preset runs it), on the machine's first GPU."""

    @pytest.fixture(scope="class")
    def engine(self, ray_local, smollm2, cuda_vllm):
        group = EngineGroup(smollm2, "cuda", RolloutConfig(num_engines=1, gpu_memory_utilization=0.3),
                            max_model_len=1024, dtype="bfloat16").ready()
        yield group
        group.shutdown()

    def test_n16_logprobs_match_transformers_bf16(self, engine, smollm2):
        groups = engine.generate(prompts(smollm2), 16, temperature=T, max_tokens=64)
        samples = [s for g in groups for s in g]
        assert [len(g) for g in groups] == [16] * len(QUESTIONS)
        assert all(len({tuple(s.completion_ids) for s in g}) > 1 for g in groups)  # real sampling
        assert all(len(s.logprobs) == len(s.completion_ids) > 0 for s in samples)
        assert_bf16_close(logprob_gaps(samples, smollm2))

    def test_gloo_broadcast_into_a_gpu_engine(self, engine, smollm2):
        """One GPU: this process sends over gloo from CPU; the engine receives into CUDA buffers and loads in place
        under its CUDA graphs. Afterwards its logprobs are those of the new weights."""
        new = perturbed_state(smollm2)
        named = {k: v for k, v in new.items() if k != "lm_head.weight"}  # tied: it travels as the embedding
        plan = weight_sync.plan_buckets([(n, torch.bfloat16, tuple(t.shape)) for n, t in named.items()], 64 << 20)
        bf16 = {k: v.to(torch.bfloat16) for k, v in named.items()}
        host, port = "127.0.0.1", weight_sync.free_port("127.0.0.1")
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("g", weight_sync.open_group("gloo", host, port, 2, 0, 120)))
        t.start()
        ray.get(engine.open_weight_group("gloo", host, port, 2, 120, plan))
        t.join()
        refs = engine.receive_weights(3)
        weight_sync.send(box["g"], plan, 3, (weight_sync.pack(b, bf16, "cpu") for b in plan), "cpu")
        print("gloo receive into the GPU engine:", ray.get(refs)[0])
        groups = engine.generate(prompts(smollm2), 8, temperature=T, max_tokens=48)
        samples = [s for g in groups for s in g]
        assert all(s.weight_version == 3 for s in samples)
        assert_bf16_close(logprob_gaps(samples, smollm2, new))
        stale = logprob_gaps(samples, smollm2)["engine_vs_hf_bf16"]
        assert stale > 0.3, f"the engine's logprobs are as close to the old weights ({stale:.3f}): update lost?"


def learner_cfg(stage: int, workers: int) -> LearnerConfig:
    return LearnerConfig(num_workers=workers, zero_stage=stage, lr=LR, betas=(0.9, 0.99), max_grad_norm=CLIP,
                         micro_batch_size=2, bucket_mb=64)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_step_against_fp32_reference(stage, ray_local, tiny_model):
    """DeepSpeed bf16 (fp32 master weights) on NCCL, one rank per GPU (at most 2), against plain fp32 torch.

    Adam's first step moves every weight by about lr·sign(gradient), so a correct bf16 step moves (nearly) every
    weight the way the fp32 reference does; bf16 can flip a sign only where the gradient is at rounding level. A
    step with a wrong loss, wrong scaling or no update fails the sign agreement and the loss and norm checks.
    """
    workers = min(2, GPUS)
    group = LearnerGroup(tiny_model, "cuda", learner_cfg(stage, workers), GRPOConfig(), total_steps=10,
                         dtype="bfloat16").ready()
    try:
        samples = make_batch(0, n=8)
        ref_loss, ref_norm, ref_weights = reference_step(tiny_model, samples, "cuda")
        m = group.train_step(samples, T)
        weights = group.full_state_dict()
    finally:
        group.shutdown()
    start = state(load(tiny_model))
    assert m["optimizer_steps"] == 1 and m["loss"] == pytest.approx(ref_loss, rel=0.02, abs=1e-3)
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=0.05)
    agree, moved = 0, 0
    for k, ref in ref_weights.items():
        step_ref = ref - start[k]
        step = weights[k].float() - start[k].to(weights[k].dtype).float()
        big = step_ref.abs() > LR / 2  # weights whose reference step is not at rounding level
        agree += int((torch.sign(step[big]) == torch.sign(step_ref[big])).sum())
        moved += int(big.sum())
    assert moved > 1000 and agree / moved > 0.97, f"{agree}/{moved} weights stepped the reference's way"


def smollm2_batch(model_path: str) -> list[TrainSample]:
    """A GRPO batch in SmolLM2's vocabulary: each question with a short answer, advantages of both signs."""
    tok = AutoTokenizer.from_pretrained(model_path)
    answers = [" 48 + 24 = 72. <answer>72</answer>", " 12 / 60 * 50 = 10. <answer>10</answer>", " <answer>391</answer>"]
    return [TrainSample(tok.encode(q), tok.encode(a), [-1.0] * len(tok.encode(a)), adv)
            for q, a in zip(QUESTIONS, answers) for adv in (1.0, -0.5)]


def broadcast_into_engine(tp: int, smollm2: str) -> None:
    """Learner rank 0 (its own GPU) → one engine of TP `tp` over NCCL, then the engine's logprobs against
    transformers holding the learner's weights."""
    learner = LearnerGroup(smollm2, "cuda", learner_cfg(2, 1), GRPOConfig(), total_steps=10, dtype="bfloat16")
    engines = EngineGroup(smollm2, "cuda", RolloutConfig(num_engines=1, tensor_parallel_size=tp,
                                                         gpu_memory_utilization=0.5),
                          max_model_len=1024, dtype="bfloat16")
    try:
        learner.ready(), engines.ready()
        learner.train_step(smollm2_batch(smollm2), T)  # the weights the engine gets are not the ones it started with
        plan = learner.weight_plan()
        host, port = learner.sender_address()
        world = 1 + engines.num_workers
        ray.get(learner.open_weight_group("nccl", host, port, world, 120) +
                engines.open_weight_group("nccl", host, port, world, 120, plan))
        results = ray.get(learner.broadcast_weights(5) + engines.receive_weights(5))
        print(f"NCCL sync TP {tp}: learner {results[0]}, engine {results[1:]}")
        groups = engines.generate(prompts(smollm2), 8, temperature=T, max_tokens=48)
        samples = [s for g in groups for s in g]
        assert all(s.weight_version == 5 for s in samples)
        assert_bf16_close(logprob_gaps(samples, smollm2, learner.full_state_dict()))
    finally:
        learner.shutdown(), engines.shutdown()


@needs_gpus(2, "an NCCL broadcast needs the learner and the engine on different GPUs")
def test_nccl_broadcast_into_engine_tp1(ray_local, smollm2, cuda_vllm):
    broadcast_into_engine(1, smollm2)


@needs_gpus(3, "learner rank 0 plus an engine of TP 2, each on its own GPU")
def test_nccl_broadcast_into_engine_tp2(ray_local, smollm2, cuda_vllm):
    broadcast_into_engine(2, smollm2)


def test_five_step_job(tmp_path, cuda_vllm, smollm2):
    """The GSM8K job with SmolLM2 on CUDA for 5 steps, in a process of its own: the GPU preset's shape on 2+ GPUs,
    learner and engine sharing the GPU on one (scripts/one_gpu_job.py)."""
    entry = "launch/gsm8k.py" if GPUS >= 2 else "scripts/one_gpu_job.py"
    cmd = [sys.executable, entry, "--config", "gsm8k_qwen2.5_0.5b.yaml", "model.path=builtin:smollm2-135m-instruct",
           "train.device=cuda", "train.steps=5", "train.prompts_per_step=8", "rollout.n=8", "rollout.max_tokens=128",
           "rollout.gpu_memory_utilization=0.3", "grpo.filter_groups=false", "eval.every=5", "eval.num_examples=32",
           "ckpt.every=0", "ckpt.export_hf=false", "log.sample_every=0", f"train.output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all("loss" in r for r in train)  # filter_groups off: every step reaches the learner...
    assert [r["weight_version"] for r in train] == [0, 1, 2, 3, 4]  # ...and each sync reaches the engine
    assert statistics.mean(r["logprob_mismatch"] for r in train) < 0.1  # bf16 engine vs bf16 learner
    assert any("eval/accuracy" in r for r in rows)
