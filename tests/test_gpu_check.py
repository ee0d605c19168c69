"""The GPU check's tiers (scripts/gpu_check.py) on CPU, as CI runs every GPU function: the same checks on gloo.
Tier 1 runs with Ray and vLLM made unimportable, as on the GPU image it is written for."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
NO_RAY_NO_VLLM = """
import sys
for name in ("ray", "vllm"):
    sys.modules[name] = None  # `import ray` raises ImportError, as on an image without it
"""


def run_check(tmp_path, *args, block: bool = False, cmd: tuple = (sys.executable, "scripts/gpu_check.py"),
              extra_env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    if block:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(NO_RAY_NO_VLLM)
        path.insert(0, str(tmp_path / "site"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **(extra_env or {}))
    out = subprocess.run([*cmd, *args, "--device", "cpu", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text()) if (tmp_path / "gpu_check.json").exists() else {}
    return out, report


def test_tier1_kit_installs_and_runs_without_ray_or_vllm(tmp_path):
    """The device call as it is made: the kit's wheels (built here from the registry, as `kit` does before a
    sitting) installed into a folder of their own by scripts/gpu_check.sh, then tier 1 on them."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the GPU image's is 3.12
    kit = subprocess.run([sys.executable, "scripts/gpu_check.py", "kit", "--kit-dir", str(tmp_path / "kit"),
                          "--python", python], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert kit.returncode == 0, kit.stdout + kit.stderr
    assert "deepspeed-" in kit.stdout and "pydantic_core-" in kit.stdout
    out, report = run_check(tmp_path, "tier1", block=True, cmd=("bash", "scripts/gpu_check.sh"),
                            extra_env={"PYTHON": sys.executable, "RLVR_TIER1_SITE": str(tmp_path / "t1"),
                                       "RLVR_TIER1_KIT": str(tmp_path / "kit")})
    assert "installed 6 wheels" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    checks = report["tier1"]["checks"]
    assert set(checks) == {"ws1_group_open_sync_abort_reopen", "zero2_bf16_step_and_chunked_logprobs",
                           "zero3_bf16_step_and_chunked_logprobs", "weight_group_into_plain_receiver",
                           "learner_tokens_per_s_and_memory"}
    assert all(c["ok"] is True for c in checks.values()), checks
    assert checks["weight_group_into_plain_receiver"]["syncs"] == 3  # two, abort, reopen, one
    assert checks["zero3_bf16_step_and_chunked_logprobs"]["step_agreement"] > 0.97
    speed = checks["learner_tokens_per_s_and_memory"]
    assert speed["tokens_per_s"] > 0 and speed["shared"]["tokens_per_s"] > 0 and speed["shared_over_padded"] > 0


def test_tier2_turns_test_results_into_checks(tmp_path, cpu_vllm):
    out, report = run_check(tmp_path, "tier2", "--stages", "tests", "-k", "prompts_are or world_size_1")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    checks = report["tier2"]["checks"]
    assert checks.keys() == {"test_gpu::test_prompts_are_token_ids",
                             "test_gpu::test_world_size_1_group_opens_broadcasts_aborts_and_reopens"}, checks
    assert all(c["ok"] is True for c in checks.values())


def test_the_qwen25_05b_stand_in_has_the_real_models_size(tmp_path, tiny_model):
    """The random model that the GPU bench and tier 1 build on the device (no hub there): Qwen2.5-0.5B's
    494,032,768 parameters, as learner/memory.py counts them from its config (the presets' sizes rest on that)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from core.models import build_qwen25_05b_shape
    from learner import memory

    path = build_qwen25_05b_shape(tmp_path / "shape", tiny_model)
    numel = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                assert st.get_slice(k).get_dtype() == "BF16", k
                shape = st.get_slice(k).get_shape()
                numel += math.prod(shape)
    assert numel == 494_032_768
    assert memory.model_dims(AutoConfig.from_pretrained(path).to_dict())["params"] == numel
