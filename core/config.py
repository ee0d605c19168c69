"""The config sections that cross the Ray boundary, as typed objects: the rollout engines get `RolloutConfig`, the
learner ranks `LearnerConfig` and `GRPOConfig` (pickled as they are, read by attribute). `launch.config.Config`
assembles them with the sections only the driver reads."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RolloutConfig(Strict):
    num_engines: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per engine (one node); must be 1 on CPU
    n: int = Field(16, ge=1)  # samples per prompt (the GRPO group)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    stop: list[str] = []
    max_model_len: int | None = None  # default: data.max_prompt_tokens + max_tokens
    overlong_prompt: Literal["drop", "truncate_left"] = "drop"  # engine-side guard for prompts past the window
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    cpu_kv_cache_gb: float = Field(1.0, gt=0)  # CPU engines reserve this much RAM for the KV cache
    cpus_per_engine: int = Field(1, ge=1)  # Ray CPU resource per engine actor
    threads: int | None = None  # CPU only: compute threads per engine (default cpus_per_engine)
    enforce_eager: bool = False  # CUDA graphs on GPU unless true; CPU always runs eager
    # KV-cache block in tokens (null: vLLM's, 16 on GPU and 128 on CPU). The prefix cache reuses whole blocks only,
    # so each multi-turn turn recomputes up to a block of its context; smaller blocks cut that (on CPU multiples of
    # 32 run fastest).
    block_size: int | None = Field(None, ge=1)
    # An engine that dies or hangs is replaced in its placement-group bundle and given the current weights; this
    # many replacements per run (all engines together), then the job stops with the engines and causes named.
    max_restarts: int = Field(8, ge=0)
    verify_restarts: bool = True  # check a replacement's greedy tokens and logprobs against the learner's model
    # Start the engines, wait until they serve, then start the learner. vLLM sizes its KV cache from the free memory
    # of the whole GPU and asserts that it did not grow while it profiled; a learner starting beside it on a shared
    # GPU (DeepSpeed's init frees its cache) breaks that. Default (null): first on cuda, side by side on cpu (where
    # the KV cache has an explicit size and starting together saves time).
    engines_first: bool | None = None


class EnvConfig(Strict):
    """Multi-turn rollouts (`rollout.env`): an environment answers each model turn with an observation that is
    appended to the trajectory, until it says done, `max_turns` model turns were made, or the engine's window
    (`rollout.max_model_len`: prompt + every turn) is full. `name: null` keeps single-turn sampling."""

    name: str | None = None  # "python" (the built-in sandboxed Python tool), "path/to/file.py:Class", "package.module:Class"
    args: dict = {}  # keyword arguments of the environment's constructor (e.g. the Python tool's limits)
    max_turns: int = Field(4, ge=1)  # model turns per trajectory
    stop: list[str] = []  # where a model turn hands over to the environment (besides rollout.stop), e.g. a code fence
    max_observation_tokens: int = Field(256, ge=1)  # an observation is cut to this many tokens
    workers: int = Field(2, ge=1)  # processes of each engine's environment pool
    timeout_s: float = Field(30.0, gt=0)  # an environment call past this ends its trajectory (scored 0), counted
    # This many failed calls in a row (raised, timed out, killed its process) stop the run with the environment's
    # name and the last traceback.
    max_failures: int = Field(20, ge=1)


class LearnerConfig(Strict):
    num_workers: int = Field(1, ge=1)  # DeepSpeed ranks; one GPU each on GPU
    cpus_per_worker: int = Field(1, ge=1)
    threads: int | None = None  # CPU only: torch threads per rank (default cpus_per_worker)
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(1e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    micro_batch_size: int = Field(4, ge=1)  # sequences per forward/backward on one rank
    minibatches_per_step: int = Field(1, ge=1)  # optimizer steps per rollout batch
    gradient_checkpointing: bool = False
    # How a micro-batch becomes the model's rows: padded (a row per sample), shared (a row per prompt: the prompt
    # once, its samples' completions after it under a 4D mask), packed (one row per micro-batch); auto: per device
    # by measurement (learner/layout.py). shared and packed need SDPA or eager attention, else padded is used.
    layout: Literal["auto", "padded", "shared", "packed"] = "auto"
    max_nonfinite_steps: int = Field(3, ge=1)  # abort after this many steps in a row with a NaN/inf loss
    bucket_mb: int = Field(256, ge=1)  # weight broadcast bucket size


class GRPOConfig(Strict):
    scale_rewards: bool = True  # divide by the group std; false (with loss_agg: token_sum_norm) = Dr.GRPO
    eps: float = Field(1e-6, gt=0)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)  # "clip-higher" (DAPO); equal to clip_low gives PPO's symmetric clip
    # token_mean: per token over the minibatch; seq_mean: per sequence; token_sum_norm: token sums over a constant
    # (sequences × rollout.max_tokens), Dr.GRPO's unbiased aggregation
    loss_agg: Literal["token_mean", "seq_mean", "token_sum_norm"] = "token_mean"
    beta: float = Field(0.0, ge=0)  # KL (k3) to the initial model; 0 = off, no reference model loaded
    # The ratio's old policy: the learner's own logprobs before the update (recomputed), or the engine's.
    old_logprobs: Literal["learner", "vllm"] = "learner"
    # Correction for the engine ↔ learner gap (kernels, dtypes, a step of staleness): each token's policy-gradient
    # term times min(π_old / π_vLLM, importance_cap) (token), or sequences whose mean log-ratio is beyond
    # ±log(importance_cap) masked out (seq_mask); needs old_logprobs: learner.
    importance: Literal["token", "seq_mask", "off"] = "token"
    importance_cap: float = Field(2.0, gt=1)
    # Samples cut at rollout.max_tokens: kept (off), left out of the loss (mask: DAPO overlong filtering), or
    # rewarded less over the last overlong_buffer tokens, down to −1 at the limit (penalty: DAPO overlong shaping).
    overlong: Literal["off", "mask", "penalty"] = "off"
    overlong_buffer: int = Field(64, ge=1)
    filter_groups: bool = True  # drop groups whose rewards are all equal (zero advantage), counted
    # DAPO dynamic sampling: after filtering, draw further prompts in data order (as many as groups are missing)
    # until the step has train.prompts_per_step groups, or refill_max_prompts extra prompts were drawn (default
    # 4 × prompts_per_step; then the step trains on what it has, counted as `refill_capped`).
    refill: bool = False
    refill_max_prompts: int | None = Field(None, ge=1)
