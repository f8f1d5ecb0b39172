#!/usr/bin/env bash
# The test suite: builds the development checkpoints, exports and model repositories once per run
# (session fixtures, cached under .cache/test-artifacts) and runs every test on this CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-llamacpp.sh  # the int4/int8 decoder's engine: built once, then cached
. .venv/bin/activate
# A first run writes checkpoints, ONNX and GGUF exports under .cache/test-artifacts, llama.cpp's source
# and wheel in ~/.cache/medgemma-triton, pytest's temporary files and the full-size vision dry run (the
# README's Requirements give the sizes). Short of that room, the run ends minutes later in dozens of
# "No space left on device" errors, so say so now.
python - <<'PY'
import os, shutil, sys, tempfile
from pathlib import Path
cache = Path(os.environ.get("MEDGEMMA_TEST_CACHE", ".cache/test-artifacts"))
need_gb = 3.5 if (cache / "checkpoints" / "dev").is_dir() else 6.5
cache.mkdir(parents=True, exist_ok=True)
for place in {cache.resolve(), Path(tempfile.gettempdir()).resolve()}:
    free_gb = shutil.disk_usage(place).free / 1e9
    if free_gb < need_gb:
        sys.exit(f"error: the test run needs about {need_gb} GB free disk; {place} has {free_gb:.1f} GB")
PY
ruff check --quiet . || { echo "error: ruff check found problems (above); fix them before the tests run" >&2; exit 1; }
exec python -m pytest -q -ra --durations=25 "$@"
