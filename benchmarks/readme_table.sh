#!/usr/bin/env bash
# The served benchmark table (docs/performance.md; past runs in CHANGELOG.md): the dev checkpoint
# on the cpu profile, fp32, int4 and int8, concurrency 1 and 4, next to the transformers baseline
# (model-card generate) in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
CHECKPOINT="${CHECKPOINT:-.cache/test-artifacts/checkpoints/dev}"
OUT="${OUT:-results/readme}"
[ -d "$CHECKPOINT" ] || medgemma-triton dev-checkpoint --kind dev --output "$CHECKPOINT"
for precision in fp32 int4 int8; do
    repo=".cache/bench/repo-$precision"
    medgemma-triton build cpu --checkpoint "$CHECKPOINT" --precision "$precision" --output "$repo" \
        --cache-dir .cache/bench/artifacts
    medgemma-triton serve "$repo" --grpc-port 8101 --http-port 8100 --metrics-port 8102 &
    server=$!
    python -c "from medgemma_triton.client import MedGemmaClient as C; C('127.0.0.1:8101').wait_until_ready(timeout=300)"
    baseline=()
    [ "$precision" = fp32 ] && baseline=(--baseline --checkpoint "$CHECKPOINT" --baseline-requests 4)
    python benchmarks/throughput.py --url 127.0.0.1:8101 --concurrency 1,4 --num-requests 8 \
        --warmup-requests 1 --input-tokens 128 --output-tokens 64 --images 1 \
        --output-dir "$OUT/$precision" "${baseline[@]}"
    kill "$server"; wait "$server" || true
done
