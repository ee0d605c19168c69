"""`LearnerWorker`: one DeepSpeed ZeRO rank inside one Ray actor.

It turns a `TrainShard` into `minibatches_per_step` optimizer steps (any number of micro-batches each, DeepSpeed's
unmanaged gradient accumulation), sends the weights as rank 0 of the weight group, and saves/loads the full
training state. The same code runs on GPU (NCCL, bf16) and CPU (gloo, fp32).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import pathlib
import random
import time

import torch

from learner import grpo, layout as layouts
from core import accel, patches, weight_sync
from core.config import GRPOConfig, LearnerConfig
from core.types import TrainSample, TrainShard
from learner.shards import RankSums


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup over `warmup` steps, then constant, cosine or
    linear decay to `min_ratio` at step `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"unknown lr schedule {schedule!r}")


# Config fields of models whose forward rescales or caps the head's logits: the learner computes logprobs from the
# head itself (`LearnerWorker._completion_logprobs`), so it refuses such models rather than train on other numbers.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def worker_env(device: str, threads: int) -> dict[str, str]:
    """Environment for a learner process, set before torch/DeepSpeed are imported (Ray `runtime_env`)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":  # CUDA_VISIBLE_DEVICES blank: a CPU rank never touches a GPU that the machine may have
        env.update(OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def own_process_tree() -> dict:
    """`core.reap.process_tree` inside Ray; empty in a plain process (scripts/gpu_check.py's kit has no Ray)."""
    try:
        import ray
    except ImportError:
        return {}

    from core.reap import process_tree

    return process_tree() if ray.is_initialized() else {}


def node_address() -> str:
    """This node's address in the Ray cluster; 127.0.0.1 in a plain process (scripts/gpu_check.py runs the learner
    without Ray)."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class LearnerWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def address(self) -> tuple[str, int]:
        host = node_address()
        return host, weight_sync.free_port(host)

    def setup(self, master: tuple[str, int], model_path: str, device: str, cfg: LearnerConfig, grpo_cfg: GRPOConfig,
              total_steps: int, dtype: str = "auto", seed: int = 0, timeout_s: float = 1800.0) -> dict:
        """Join the DeepSpeed group and build model, optimizer and schedule. All ranks call this together.
        `timeout_s` bounds every collective of the group: a rank whose peer died or hangs raises instead of waiting."""
        started_at = time.time()  # wall clock: the driver compares it with the engines' (rollout.engines_first)
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed
        from transformers import AutoModelForCausalLM

        from core.models import resolve_dtype, resolve_model

        model_path = resolve_model(model_path)  # built-ins are made on this node if absent

        self.device, self.cfg, self.grpo = device, cfg, grpo_cfg
        if device == "cpu":
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
            patches.skip_deepspeed_shm_build()
        self.accel = accel.for_device(device)
        self.accel.set_device()  # CUDA: Ray exposes this rank's GPU as device 0
        deepspeed.init_distributed(dist_backend=weight_sync.BACKEND_FOR_DEVICE[device], verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.dtype = getattr(torch, resolve_dtype(dtype, device))
        self.model_path = model_path

        random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # each step() is a boundary, after any number of backward()
            "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
        }
        if self.dtype == torch.bfloat16:
            # Mixed precision as torch autocast: the parameters, their gradients (accumulated over micro-batches and
            # reduced over ranks) and the optimizer stay fp32; matmuls run in bf16. DeepSpeed's "bf16" mode would
            # keep bf16 parameters and accumulate their gradients in bf16. No module communicates in bf16 (empty
            # lower_precision_safe_modules), so gradient reductions stay fp32 too.
            ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        self.zero3 = cfg.zero_stage == 3
        if self.zero3:
            # While this object lives, from_pretrained builds every model inside deepspeed.zero.Init: each parameter
            # is partitioned as it is created, so no rank ever holds a full copy (the policy nor the reference).
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        partitioned_at_build = all(hasattr(p, "ds_id") for p in model.parameters())
        for name in LOGIT_TRANSFORMS:
            if getattr(model.config, name, None) not in (None, 1, 1.0):
                raise ValueError(f"{model_path}: config.{name}={getattr(model.config, name)} transforms the logits "
                                 f"after the output head; the learner computes logprobs from the head and does not "
                                 f"support such models")
        self.chunk = grpo.chunk_positions(model.config.vocab_size)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.attention = model.config._attn_implementation
        self.layout, layout_note = layouts.choose(cfg.layout, device, self.attention)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                      weight_decay=cfg.weight_decay)
        total = total_steps * cfg.minibatches_per_step
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
            s, total, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                    config=ds_config)
        self.ref_model = None
        ref_local = 0
        if grpo_cfg.beta > 0:
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).requires_grad_(False)
            if self.zero3:  # a second, inference-only ZeRO-3 engine: 1/world of the reference per rank
                self.ref_model = deepspeed.initialize(model=ref, config=ds_config)[0]
            else:  # ZeRO-2 keeps a full policy per rank anyway; the reference is one more, in the compute dtype
                self.ref_model = ref.to(self.dtype).to(self._dev)
            self.ref_model.eval()
            ref_local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in ref.parameters())
        self.nonfinite_streak = 0
        self.weight_group = None
        self.plan = None
        self.pack_buffers = None
        tree = own_process_tree()  # for reaping this rank after its driver is lost
        return {"rank": self.rank, "pid": os.getpid(), "node": node_address(), "started_at": started_at,
                "node_id": tree.get("node_id"), "tree": tree.get("tree", []),
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()),
                "layout": self.layout, "layout_note": layout_note,
                "partitioned_at_build": partitioned_at_build, "ref_params_local": ref_local,
                "param_dtype": str(next(self.engine.module.parameters()).dtype).removeprefix("torch."),
                "grad_accum_dtype": str(self.engine.get_data_types()[1]).removeprefix("torch.")}

    @property
    def _dev(self) -> torch.device:
        return torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")

    # ---- one rollout batch → optimizer steps -------------------------------------------------------------------

    def _collate(self, samples: list[TrainSample], layout: str | None = None) -> dict[str, torch.Tensor]:
        """The model's rows for these samples in `self.layout` (`learner.layout`), and per sample [B, C]: the loss
        mask, the engine's logprobs and the advantage."""
        if not samples:  # an empty micro-batch keeps every rank's collective count equal
            samples = [TrainSample([self.pad_id], [self.pad_id], [0.0], 0.0)]
            empty = True
        else:
            empty = False
        batch = layouts.rows(samples, layout or self.layout, self.pad_id, self.attention)
        B, C = batch["targets"].shape
        batch["mask"] = torch.zeros((B, C))
        batch["vllm_lp"] = torch.zeros((B, C))
        for i, s in enumerate(samples):
            c = len(s.completion_ids)
            mask = torch.ones(c) if s.mask is None else torch.tensor(s.mask[:c], dtype=torch.float32)
            batch["mask"][i, :c] = 0.0 if empty else mask
            # Environment tokens (mask 0) carry no engine logprob: theirs are never read.
            batch["vllm_lp"][i, :len(s.logprobs)] = torch.tensor(s.logprobs[:c]) * mask[:len(s.logprobs)]
        batch["adv"] = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        return {k: v.to(self._dev) for k, v in batch.items()}

    def _completion_logprobs(self, model, batch, temperature: float,
                             with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprobs [B, C] of the completion tokens under softmax(logits / T), and their entropies if asked.

        No [B, C, V] logits are ever made: for one forward, the model's output head returns these logprobs instead
        of logits, computed a chunk of positions at a time from the hidden states of the positions that predict the
        completion tokens (`batch["predictors"]`, whatever the layout; `grpo.chunked_logprobs`). Doing it inside
        the head's own forward keeps ZeRO-3 right (DeepSpeed gathers a partitioned head weight, tied or not, around
        that module's forward and backward only) and makes the logprobs the output that DeepSpeed's engine hooks.
        """
        module = getattr(model, "module", model)  # a DeepSpeed engine or a plain model
        head = module.get_output_embeddings()
        plain_head = functools.partial(type(head).forward, head)
        entropy = {}

        def logprobs_head(hidden: torch.Tensor) -> torch.Tensor:  # hidden [R, L, H] → the predicting positions
            predicting = hidden.reshape(-1, hidden.shape[-1])[batch["predictors"]]  # [B, C, H]
            lp, entropy["value"] = grpo.chunked_logprobs(predicting, plain_head, batch["targets"], temperature,
                                                         self.chunk, with_entropy)
            return lp

        head.forward = logprobs_head
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False)
        finally:
            del head.forward
        return out.logits, entropy["value"]

    @staticmethod
    def _chunks(samples: list[TrainSample], parts: int) -> list[list[TrainSample]]:
        """`parts` micro-batches (some possibly empty): a prompt's samples together (they share its rows), similar
        lengths together to cut padding; the loss does not depend on the order because every share divides by the
        minibatch's global count."""
        ordered = sorted(samples, key=lambda s: (len(s.prompt_ids), s.prompt_ids, len(s.completion_ids)))
        size = max(1, math.ceil(len(ordered) / parts)) if ordered else 1
        return [ordered[i * size:(i + 1) * size] for i in range(parts)]

    def _all_ranks_finite(self, value: torch.Tensor) -> bool:
        import deepspeed.comm as dist

        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self._dev)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def train_step(self, shard: TrainShard) -> RankSums:
        """One rollout batch: for each minibatch, forward/backward over its micro-batches, then one optimizer step.
        Returns sums (to be added across ranks) and per-step values."""
        temperature, agg = shard.temperature, self.grpo.loss_agg
        recompute = self.grpo.old_logprobs == "learner" and len(shard.minibatches) > 1
        m = RankSums()
        start = time.perf_counter()
        self.accel.reset_peak_memory()
        lr = self.engine.get_lr()[0]  # the LR this batch's first step uses (step() advances the schedule)
        self.engine.train()
        # Old logprobs. With one minibatch the policy before the update is the one of the first forward, so the
        # detached logprobs of that forward are the recomputed old logprobs; with several, a no-grad pass first.
        micro_by_mb = [self._chunks(samples, shard.micro_batches[k]) for k, samples in enumerate(shard.minibatches)]
        old_by_mb: list[list] = []
        for micro in micro_by_mb:
            old_by_mb.append([None] * len(micro))
            if recompute:
                with torch.no_grad():
                    for j, mb in enumerate(micro):
                        batch = self._collate(mb)
                        old_by_mb[-1][j] = self._completion_logprobs(self.engine, batch, temperature)[0]
        for k, micro in enumerate(micro_by_mb):
            denominator = grpo.loss_denominator(agg, shard.global_tokens[k], shard.global_seqs[k], shard.max_tokens)
            backward_done = False
            for j, mb in enumerate(micro):
                batch = self._collate(mb)
                mask = batch["mask"]
                lp, ent = self._completion_logprobs(self.engine, batch, temperature, with_entropy=True)
                if self.grpo.old_logprobs == "vllm":
                    old = batch["vllm_lp"]
                else:
                    old = old_by_mb[k][j] if recompute else lp.detach()
                ref = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref = self._completion_logprobs(self.ref_model, batch, temperature)[0]
                # Importance correction: the engine sampled from π_vLLM (its kernels, a step behind when generation
                # runs ahead), the update's old policy is the learner's π_old.
                weights, tis = grpo.importance_weights(old, batch["vllm_lp"], mask, self.grpo.importance,
                                                       self.grpo.importance_cap)
                tok_loss, stats = grpo.policy_loss(lp, old, batch["adv"], mask, self.grpo.clip_low,
                                                   self.grpo.clip_high, ref, self.grpo.beta, weights)
                share = grpo.aggregate(tok_loss, mask, agg, max(1, denominator))
                if not self._all_ranks_finite(share.detach()):
                    m.nonfinite_microbatches += 1
                    continue
                # DeepSpeed averages gradients over ranks; the shares already divide by the global count.
                self.engine.backward(share * self.world_size, scale_wrt_gas=False)
                backward_done = True
                n_tok = float(mask.sum())
                m.tokens += n_tok
                m.seqs += float(len(mb))
                m.loss += float(share.detach())
                m.clipped_tokens += float(stats["clipped_tokens"])
                m.ratio_sum += float(stats["ratio_sum"])
                if n_tok:
                    m.ratio_max = max(m.ratio_max, float(stats["ratio_max"]))
                    m.ratio_min = min(m.ratio_min, float(stats["ratio_min"]))
                m.kl_sum += float(stats.get("kl_sum", 0.0))
                m.entropy_sum += float((ent * mask).sum())
                m.mismatch_kl_sum += float(tis["mismatch_kl"])
                m.is_capped_tokens += float(tis["capped"])
                # Learner vs vLLM logprobs of the same tokens, under the weights that sampled them (pre-update).
                pre = old_by_mb[k][j] if recompute else (lp.detach() if k == 0 else None)
                if pre is not None:
                    m.mismatch_sum += float(((pre - batch["vllm_lp"]).abs() * mask).sum())
                    m.mismatch_tokens += n_tok
                del ent, lp
            if backward_done:
                self.engine.step()
                m.steps += 1
            else:
                m.skipped_steps += 1
        if m.nonfinite_microbatches:
            self.nonfinite_streak += 1
            if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"non-finite loss in {self.nonfinite_streak} steps in a row (learner.max_nonfinite_steps="
                    f"{self.cfg.max_nonfinite_steps}); lower learner.lr, check the rewards for NaN, or use float32")
        else:
            self.nonfinite_streak = 0
        norm = self.engine.get_global_grad_norm() if m.steps else None
        m.grad_norm, m.lr = float(norm) if norm is not None else float("nan"), lr
        m.train_seconds, m.peak_memory_bytes = time.perf_counter() - start, self.accel.peak_memory_bytes()
        return m

    # ---- weights out -------------------------------------------------------------------------------------------

    def _named_params(self):
        return list(self.engine.module.named_parameters())

    def weight_plan(self) -> list:
        """Buckets in the compute dtype (the engines' dtype): fp32 parameters are sent as bf16 under autocast."""
        params = [(n, self.dtype if p.is_floating_point() else p.dtype, tuple(p.ds_shape) if self.zero3 else tuple(p.shape))
                  for n, p in self._named_params()]
        self.plan = weight_sync.plan_buckets(params, self.cfg.bucket_mb << 20)
        self.pack_buffers = None
        return self.plan

    def open_weight_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float) -> int:
        """Rank 0 joins as the sender (a group left from before, e.g. broken by a failed sync, is closed first)."""
        if self.plan is None:
            self.weight_plan()
        if self.rank == 0:
            self.close_weight_group()
            self.weight_group = weight_sync.open_group(backend, host, port, world_size, 0, timeout_s)
        return self.rank

    def close_weight_group(self) -> None:
        weight_sync.close_group(self.weight_group)
        self.weight_group = None

    def _flat_buckets(self):
        """Each bucket as one flat tensor (rank 0); under ZeRO-3 every rank takes part in gathering it."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        named = dict(self._named_params())
        if self.rank == 0 and self.pack_buffers is None:
            self.pack_buffers = weight_sync.RotatingBuffers(self.plan, self._dev)
        for bucket in self.plan:
            params = [named[t.name] for t in bucket.tensors]
            ctx = GatheredParameters(params) if self.zero3 else contextlib.nullcontext()
            with ctx, torch.no_grad():
                if self.rank != 0:
                    yield None
                    continue
                yield weight_sync.pack(bucket, {t.name: named[t.name].data for t in bucket.tensors}, self._dev,
                                       out=self.pack_buffers.next(bucket))

    def broadcast_weights(self, version: int) -> dict:
        """Rank 0 sends; under ZeRO-3 every rank gathers each bucket with it. If the wire fails, rank 0 still takes
        part in the remaining gathers before raising, so the other ranks do not wait on it in a collective."""
        start = time.perf_counter()
        buckets = self._flat_buckets()
        sent = 0
        try:
            if self.rank == 0:
                sent = weight_sync.send(self.weight_group, self.plan, version, buckets, self._dev)
        finally:
            for _ in buckets:
                pass
        return {"bytes": sent, "seconds": time.perf_counter() - start}

    def score(self, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> dict:
        """The learner's logprobs of a completion and its greedy (argmax) token at each position, e.g. to check an
        engine's weights against the learner's. All ranks call it together (ZeRO-3 gathers in the forward)."""
        self.engine.eval()
        batch = self._collate([TrainSample(prompt_ids, completion_ids, [0.0] * len(completion_ids), 0.0)], "padded")
        with torch.no_grad():
            lp, _ = self._completion_logprobs(self.engine, batch, temperature)
            logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], logits_to_keep=len(completion_ids) + 1,
                                 use_cache=False).logits[0, :-1]  # one sequence: its logits are small
        return {"logprobs": lp[0].float().tolist(), "argmax": logits.argmax(-1).tolist()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights (rank 0 gets them, other ranks None). A collective under ZeRO-3."""
        if self.zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return {k: v.detach().cpu() for k, v in sd.items()} if self.rank == 0 else None
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()} if self.rank == 0 else None

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """DeepSpeed's checkpoint (model, optimizer, LR schedule; every rank writes its shards) plus this rank's RNG
        states in a file of its own (DeepSpeed's client state is written by data-parallel rank 0 only)."""
        self.engine.save_checkpoint(path, tag="deepspeed", save_latest=False)
        torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": self.accel.rng_state(),
                    "nonfinite_streak": self.nonfinite_streak}, f"{path}/rng_rank{self.rank}.pt")

    def list_files(self, path: str) -> dict[str, int]:
        """{relative path: size} of every file under `path` as this rank sees it (checks shared storage)."""
        root = pathlib.Path(path)
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    def load(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        state = torch.load(f"{path}/rng_rank{self.rank}.pt", weights_only=False)
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        self.accel.set_rng_state(state["cuda"])
        self.nonfinite_streak = state["nonfinite_streak"]

    def export_hf(self, path: str) -> str | None:
        """A folder that transformers and vLLM load directly (safetensors, config, tokenizer)."""
        from transformers import AutoTokenizer

        sd = self.full_state_dict()
        if self.rank != 0:
            return None
        module = self.engine.module
        module.config.use_cache = True  # a training setting off; users' generate() needs the KV cache
        try:
            module.save_pretrained(path, state_dict={k: v.to(self.dtype) for k, v in sd.items()},
                                   safe_serialization=True)
        finally:
            module.config.use_cache = False
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        return path
