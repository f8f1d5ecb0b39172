#!/usr/bin/env bash
# The test suite: builds the development checkpoints, exports and model repositories once per run
# (session fixtures, cached under .cache/test-artifacts) and runs every test on this CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -ra "$@"
