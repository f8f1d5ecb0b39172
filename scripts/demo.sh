#!/usr/bin/env bash
# The main job on a fresh machine: build the `dev` checkpoint (real Gemma 3 270M weights + a small
# SigLIP tower), build a cpu-profile Triton model repository from it, serve it on loopback, and
# stream the answer to a chat with an image (a CT slice that ships inside pydicom).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

WORK="${MEDGEMMA_DEMO_DIR:-.cache/demo}"
CHECKPOINT="${CHECKPOINT:-$WORK/checkpoints/dev}"
GRPC_PORT="${GRPC_PORT:-8001}"
HTTP_PORT="${HTTP_PORT:-8000}"
METRICS_PORT="${METRICS_PORT:-8002}"

if [ ! -d "$CHECKPOINT" ]; then
    medgemma-triton dev-checkpoint --kind dev --output "$CHECKPOINT"
fi
medgemma-triton build cpu --checkpoint "$CHECKPOINT" --output "$WORK/repository"

medgemma-triton serve "$WORK/repository" \
    --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" --metrics-port "$METRICS_PORT" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
python - "$GRPC_PORT" "$SERVER" <<'PY'
import os, sys, time
from medgemma_triton.client import MedGemmaClient
port, server_pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
with MedGemmaClient(f"127.0.0.1:{port}") as client:
    while not client.is_ready():
        try:
            os.kill(server_pid, 0)
        except OSError:
            sys.exit("error: the server exited before it was ready (see its error above)")
        if time.monotonic() > deadline:
            sys.exit("error: the server was not ready within 300 s")
        time.sleep(1)
PY

IMAGE="$(python -c "import pydicom.data; print(pydicom.data.get_testdata_file('CT_small.dcm'))")"
medgemma-triton chat --url "127.0.0.1:$GRPC_PORT" --max-tokens 48 \
    --system "You are an expert radiologist." --image "$IMAGE" "Describe this CT slice."
echo
