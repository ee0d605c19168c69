"""Plain-torch references the learner tests compare against: one unpadded forward per sequence over the whole
[C, V] logits, torch AdamW and gradient clipping. Shared by the CPU (tests/test_learner.py) and GPU
(tests/test_gpu.py) learner tests."""
import torch
from transformers import AutoModelForCausalLM

from core.types import TrainSample

LR, CLIP, T = 1e-3, 0.5, 0.8


def make_batch(seed: int, n: int = 6) -> list[TrainSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c = 3 + i % 4, 2 + (i * 3) % 7  # uneven prompt and completion lengths: padding on both sides
        # engine logprobs near the random model's (≈ −ln 512), ±1: importance weights from 0.37 to 2.7, some capped
        out.append(TrainSample(torch.randint(3, 500, (p,), generator=g).tolist(),
                               torch.randint(3, 500, (c,), generator=g).tolist(),
                               (-6.24 + 2 * torch.rand(c, generator=g) - 1).tolist(), float(torch.randn(1, generator=g))))
    return out


def make_groups(seed: int = 0) -> list[TrainSample]:
    """Three prompts (lengths 5, 2, 7) with 3, 1 and 4 samples of 1-6 tokens, interleaved as a rollout may be."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 2, 7)]
    out = []
    for i, k in enumerate([0, 2, 0, 1, 2, 0, 2, 2]):
        c = 1 + (i * 5) % 6
        out.append(TrainSample(prompts[k], torch.randint(3, 500, (c,), generator=g).tolist(),
                               (-6.24 + 2 * torch.rand(c, generator=g) - 1).tolist(), float(torch.randn(1, generator=g))))
    return out


def gsm8k_shaped(groups: int, n: int, prompt_len: int = 170, shortest: int = 40, longest: int = 128,
                 seed: int = 0) -> list[TrainSample]:
    """GSM8K-shaped learner work: `groups` prompts of `prompt_len` tokens (the question with a worked example),
    `n` samples each, completion lengths spread over [shortest, longest] (benches and the GPU check)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(groups):
        prompt = torch.randint(3, 500, (prompt_len,), generator=g).tolist()
        for i in range(n):
            c = shortest + (longest - shortest) * ((i * 5 + k * 3) % n) // max(1, n - 1)
            out.append(TrainSample(prompt, torch.randint(3, 500, (c,), generator=g).tolist(), [-6.2] * c,
                                   float(torch.randn(1, generator=g))))
    return out


def load(model_path: str, device: str = "cpu"):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)


def plain_logprobs(model, s: TrainSample) -> torch.Tensor:
    """log softmax(logits / T) of each completion token: one unpadded forward of the whole [C, V] logits."""
    ids = torch.tensor([s.prompt_ids + s.completion_ids], device=model.device)
    logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1] / T
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.completion_ids, device=model.device)[:, None])[:, 0]


def tis(old: torch.Tensor, s: TrainSample, cap: float = 2.0) -> torch.Tensor:
    """The truncated importance weight of each token (grpo.importance: token): min(π_old / π_engine, cap)."""
    return torch.clamp(torch.exp(old.detach() - torch.tensor(s.logprobs, device=old.device)), max=cap)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def reference_step(model_path: str, samples: list[TrainSample], device: str = "cpu") -> tuple[float, float, dict]:
    """The same GRPO step written plainly (fp32). Returns the loss, the gradient norm and the new weights."""
    model = load(model_path, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
    total_tokens = sum(len(s.completion_ids) for s in samples)
    loss = 0.0
    for s in samples:
        lp = plain_logprobs(model, s)
        ratio = torch.exp(lp - lp.detach())  # on-policy: old logprobs are the current ones
        loss = loss - (tis(lp, s) * ratio * s.advantage).sum() / total_tokens
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss.item(), norm.item(), state(model)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b if k in a)


def step_agreement(start: dict, ref_weights: dict, weights: dict) -> tuple[int, int]:
    """(weights that stepped the reference's way, weights whose reference step is not at rounding level).

    Adam's first step moves every weight by about lr·sign(gradient), so a correct bf16 step moves (nearly) every
    weight the way the fp32 reference does; bf16 can flip a sign only where the gradient is at rounding level."""
    agree, moved = 0, 0
    for k, ref in ref_weights.items():
        step_ref = ref - start[k]
        step = weights[k].float() - start[k].to(weights[k].dtype).float()
        big = step_ref.abs() > LR / 2
        agree += int((torch.sign(step[big]) == torch.sign(step_ref[big])).sum())
        moved += int(big.sum())
    return agree, moved


def full_state_dict(learners) -> dict:
    """The learner's whole model (gathered under ZeRO-3), from rank 0 of a `LearnerGroup`."""
    from core.waits import wait_all

    refs = [w.full_state_dict.remote() for w in learners.workers]  # every rank takes part in a ZeRO-3 gather
    return wait_all(refs, [learners.name(r) for r in range(len(refs))], "full state dict",
                    learners.timeouts.checkpoint_s)[0]
