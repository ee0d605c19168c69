#!/usr/bin/env bash
# The GPU check in tiers (docs/gpu.md: the device calls and their budget). Everything is in scripts/gpu_check.py.
#
#   scripts/gpu_check.sh kit                 here (a registry): gpu_kit/tier1/, DeepSpeed and 5 small wheels (~5 MiB)
#   bash scripts/gpu_check.sh tier1 [ARGS]   there, one call carrying gpu_kit/tier1: install them beside the image's
#                                            torch, run tier 1, write $OUT/gpu_check.json
#   bash scripts/gpu_check.sh tier2 [ARGS]   there, after `scripts/gpu_kit.sh run install` (vLLM, Ray): tier 2
#
# CI runs `tier1 --device cpu` with this very script (tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
verb=${1:-}; shift || true
case "$verb" in
    kit)
        exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py kit "$@" ;;
    tier1)
        site=${RLVR_TIER1_SITE:-/tmp/rlvr-tier1-site}
        shopt -s nullglob
        kit=${RLVR_TIER1_KIT:-gpu_kit/tier1}
        wheels=("$kit"/*.whl)
        if [ ${#wheels[@]} -eq 0 ]; then
            echo "[gpu_check] no $kit/*.whl: run 'scripts/gpu_check.sh kit' here and carry gpu_kit/tier1" >&2; exit 2
        fi
        rm -rf "$site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
            "${wheels[@]}"
        echo "[gpu_check] installed ${#wheels[@]} wheels into $site"
        PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/gpu_check.py tier1 "$@" ;;
    tier2)
        home=${RLVR_KIT_HOME:-/tmp/rlvr-gpu-kit}
        if [ ! -d "$home/site" ]; then
            echo "[gpu_check] $home/site missing: run 'bash scripts/gpu_kit.sh run install' first" >&2; exit 2
        fi
        export PYTHONPATH="$home/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" RLVR_CACHE="$home/cache" \
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
        exec "$PY" scripts/gpu_check.py tier2 "$@" ;;
    *)
        sed -n 2,9p "$0" >&2; exit 2 ;;
esac
