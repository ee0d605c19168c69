#!/usr/bin/env bash
# A kit that validates the GPU path on a GPU machine that has torch but no package registry (docs/gpu.md).
#
#   scripts/gpu_kit.sh prepare            here (a registry, no GPU needed): wheels, data, this repo -> gpu_kit/
#   scripts/gpu_kit.sh receive NAME       there, once per part: keep the part that this call carried
#   scripts/gpu_kit.sh run [STAGE]        there: STAGE = install | tests | bench | job | all (default all)
#
# `prepare` prints the exact sequence of device calls. Everything is in scripts/gpu_kit.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
    exec "${PYTHON:-python3}" scripts/gpu_kit.py "$@"
fi
exec python3 scripts/gpu_kit.py "$@"
