#!/usr/bin/env bash
# llama.cpp for the cpu profile's int4/int8 decoder (idempotent): llama-cpp-python from its pinned,
# hash-checked source, built once with every CPU variant of ggml and cached (export/llamacpp_build.py).
# The fp32 demo does not need it; the tests do (scripts/test.sh runs this first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m medgemma_triton.export.llamacpp_build "$@"
