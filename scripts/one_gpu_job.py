"""The GSM8K job on a machine with one GPU, learner and engine sharing it: a validation harness for such machines
(scripts/gpu_kit.sh, tests/test_gpu.py), not a deployment shape.

    python scripts/one_gpu_job.py --config configs/gsm8k_qwen2.5_0.5b.yaml [key.sub=value ...]

The job places the learner and the engine on a GPU each. Here Ray is told of two GPUs and leaves
CUDA_VISIBLE_DEVICES alone, so both actors get the one real GPU (give the engine a small
rollout.gpu_memory_utilization, e.g. 0.3, so the learner fits beside it). NCCL refuses two ranks of one
communicator on the same GPU, so the weight broadcast goes over gloo (CUDA tensors staged through host memory);
DeepSpeed's own group, one rank, stays on NCCL. Everything else is the job as `launch/gsm8k.py` runs it.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # inherited by the local Ray cluster's workers
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from core import weight_sync  # noqa: E402
from launch.gsm8k import main  # noqa: E402

if __name__ == "__main__":
    weight_sync.BACKEND_FOR_DEVICE["cuda"] = "gloo"  # the driver picks the weight group's backend from this table
    ray.init(address="local", num_gpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    sys.exit(main(sys.argv[1:]))
