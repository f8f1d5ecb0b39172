#!/usr/bin/env bash
# Create .venv (idempotent) with everything the CPU profile, the exporter and the tests need.
# torch goes first and pinned: an unpinned torch pulls several GB of CUDA wheels on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
STAMP=.venv/.medgemma-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet torch==2.13.0
    python -m pip install --quiet -e ".[export,cpu,client,gateway,bench,gpu-quantize,test]"
    touch "$STAMP"
fi
