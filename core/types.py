"""The records that travel from the engines to the driver and on to the learner: defined once, used by both."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """One sampled completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # log p(token) under the sampling distribution (temperature applied), per completion token
    finish_reason: str  # "stop" | "length" | "dropped" (prompt past the engine's window, see rollout.overlong_prompt)
    weight_version: int  # the weights that produced it (the count of broadcasts the engine has applied)
    text: str = ""  # the model's text (multi-turn: its turns joined, without the observations)
    # Multi-turn (`rollout.env`): completion_ids interleave the model's tokens (mask 1) with the environment's
    # (mask 0, logprob 0.0, never used). None: every token is the model's.
    mask: list[int] | None = None
    env: dict = field(default_factory=dict)  # per trajectory: turns, env_tokens, env_seconds, env_reward, ... (numbers)
    transcript: str = ""  # multi-turn: the model's turns and the observations, as text (for logs)

    @property
    def model_tokens(self) -> int:
        return len(self.completion_ids) if self.mask is None else sum(self.mask)


@dataclass
class TrainSample:
    """A sample as the learner needs it: tokens, the sampling logprobs and its advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    advantage: float
    weight_version: int = 0
    mask: list[int] | None = None  # 1: a model token (trained on), 0: an environment token; None: all 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def model_tokens(self) -> int:
        """The tokens the loss counts: the model's."""
        return len(self.completion_ids) if self.mask is None else sum(self.mask)


@dataclass
class TrainShard:
    """What one learner rank gets for one rollout batch: its samples per minibatch and the global totals that
    make the loss normalisation (and so the update) independent of how samples are split across ranks."""

    minibatches: list[list[TrainSample]]
    global_tokens: list[int]  # completion tokens in each minibatch, all ranks together
    global_seqs: list[int]  # sequences in each minibatch, all ranks together
    micro_batches: list[int]  # forward/backward passes every rank makes per minibatch (padded with empty ones)
    temperature: float = 1.0
    max_tokens: int = 0  # rollout.max_tokens: the per-sequence constant of the token_sum_norm loss


@dataclass(frozen=True)
class Timeouts:
    """Seconds each phase may take (the defaults of the config's `timeouts:` section)."""

    start_s: float = 900.0  # actors starting: model load, vLLM start, DeepSpeed init
    stall_s: float = 45.0  # an engine holding a generate or a weight sync whose work count stops moving this long
    generate_s: float = 1200.0  # one rollout batch on the engines
    train_s: float = 1800.0  # one train step on the learner ranks (also their collectives' timeout)
    broadcast_s: float = 600.0  # one weight sync, and the weight group's rendezvous
    eval_s: float = 1800.0  # one evaluation pass
    checkpoint_s: float = 1800.0  # one checkpoint save or load


@dataclass
class LearnerStats:
    """A learner step's statistics, as `learner.shards.reduce_metrics` makes them from every rank's sums; the row a
    step logs holds each field under its name (`dataclasses.asdict`)."""

    loss: float  # the mean over minibatches of the minibatch loss
    clip_frac: float  # share of tokens whose ratio was clipped
    ratio_mean: float
    ratio_max: float
    ratio_min: float
    kl: float  # k3 KL to the reference, per token (0 without grpo.beta)
    entropy: float  # per token
    logprob_mismatch: float  # mean |learner − vLLM| logprob of the sampled tokens, before the update
    mismatch_kl: float  # k3 KL(π_vLLM ‖ π_old) per token, over every minibatch
    is_capped_frac: float  # tokens whose importance weight was truncated or masked
    grad_norm: float
    lr: float
    optimizer_steps: int
    skipped_steps: int
    nonfinite_microbatches: int
    train_tokens: float
    train_seqs: float
    train_seconds: float
    learner_peak_gib: float  # the largest rank's peak (CUDA: allocated tensors; CPU: the process's peak RSS so far)
