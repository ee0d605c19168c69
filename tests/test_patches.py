"""core/patches.py: every patch's target is checked without starting an engine, and a changed target is named with
the library's version (a check that cannot fail would let a renamed vLLM internal leave engines on old weights)."""
import pytest

from core import patches


def test_every_patch_target_holds_in_the_installed_versions():
    assert patches.check_all() == {}


def test_a_renamed_or_changed_target_is_refused_naming_the_version(monkeypatch):
    import vllm
    from vllm.model_executor.layers import utils
    from vllm.v1.engine.logprobs import LogprobsProcessor

    import deepspeed

    monkeypatch.delattr(utils, "dispatch_cpu_unquantized_gemm")  # renamed upstream
    monkeypatch.setattr(LogprobsProcessor, "from_new_request", classmethod(lambda cls, request: None))  # new signature
    monkeypatch.delattr(patches.importlib.import_module("deepspeed.comm.torch"), "build_shm_op")
    problems = patches.check_all()
    assert set(problems) == {"keep_plain_cpu_weights", "skip_logprob_token_text", "skip_deepspeed_shm_build"}
    assert f"vllm {vllm.__version__}: vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm is gone" in \
        problems["keep_plain_cpu_weights"]
    assert "takes ['cls', 'request'], expected ['cls', 'tokenizer', 'request']" in problems["skip_logprob_token_text"]
    assert f"deepspeed {deepspeed.__version__}" in problems["skip_deepspeed_shm_build"]
    with pytest.raises(patches.PatchTargetChanged, match=f"vllm {vllm.__version__}"):
        patches.skip_logprob_token_text()


def test_the_packer_must_still_mark_packed_layers(monkeypatch):
    """The worker finds the layers to repack by `cpu_linear`: a packer that stops setting it is refused."""
    from vllm.model_executor.layers import utils

    original = getattr(utils.dispatch_cpu_unquantized_gemm, "original", utils.dispatch_cpu_unquantized_gemm)

    def packer(layer, remove_weight):  # same name and parameters, no longer marks the layer
        return original

    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", packer)
    assert "no longer sets layer.cpu_linear" in patches.check_all()["keep_plain_cpu_weights"]
