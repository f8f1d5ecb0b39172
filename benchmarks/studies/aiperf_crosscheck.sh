#!/usr/bin/env bash
# Cross-check of `throughput.py --endpoint openai` against NVIDIA's AIPerf (PyPI `aiperf`, the
# successor to genai-perf), both through the OpenAI-compatible gateway in front of one served
# repository (default: the `dev` checkpoint; SYNTHETIC_RATE: the synthetic deployment), the same
# request, alternating rounds. See docs/benchmark-crosscheck.md for the results.
#
# Both send one chat request (PROMPT) to /v1/chat/completions, streamed, temperature 0,
# MAX_TOKENS new tokens, with the server's token counts (include_usage; AIPerf
# --use-server-token-count). TTFT p50, ITL p50 (genai-perf's definition in both: (last content time -
# first) / (output tokens - 1)) and output tokens/s are compared, as each tool reports them and
# recomputed from both tools' per-request records under one definition
# (benchmarks/studies/aiperf_crosscheck_summary.py).
#
# Environment: REPO (a built repository; default the test suite's dev-fp32), OUT, PORT (gRPC; HTTP =
#   PORT-1, metrics = PORT+1, gateway = PORT+2), CONCURRENCY (1,4), ROUNDS (3), REQUESTS (16),
#   MAX_TOKENS (32), WARMUP (2: warm-up requests before each measurement), AIPERF_VERSION (0.13.0;
#   installed in its own venv under .cache),
#   SERVER_CPUS / CLIENT_CPUS (taskset CPU lists, e.g. 0 and 1: the server and the gateway on some
#   cores, each client on others, so a client's own CPU use cannot slow the server it measures;
#   default: unpinned),
#   SYNTHETIC_RATE (tokens/s per request: build and serve the synthetic deployment in a temporary
#   folder instead of REPO), TOKENS_PER_RESPONSE (synthetic: 1),
#   TOKENIZER (AIPerf's tokenizer; default REPO's checkpoint, or for the synthetic deployment the test
#   suite's tiny checkpoint: the server's token counts are used either way),
#   SUMMARY (also write the comparison as JSON to this file).
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate

REPO="${REPO:-.cache/test-artifacts/repositories/dev-fp32}"
OUT="${OUT:-results/aiperf-crosscheck}"
PORT="${PORT:-8601}"
CONCURRENCY="${CONCURRENCY:-1,4}"
ROUNDS="${ROUNDS:-3}"
REQUESTS="${REQUESTS:-16}"
MAX_TOKENS="${MAX_TOKENS:-32}"
WARMUP="${WARMUP:-2}"
AIPERF_VERSION="${AIPERF_VERSION:-0.13.0}"
PROMPT="${PROMPT:-Describe the typical findings of a normal frontal chest X-ray in two sentences.}"
TOKENS_PER_RESPONSE="${TOKENS_PER_RESPONSE:-1}"
AIPERF_HOME=.cache/aiperf-$AIPERF_VERSION
SERVER_PIN=() CLIENT_PIN=()
if [ -n "${SERVER_CPUS:-}" ]; then SERVER_PIN=(taskset -c "$SERVER_CPUS"); fi
if [ -n "${CLIENT_CPUS:-}" ]; then CLIENT_PIN=(taskset -c "$CLIENT_CPUS"); fi
GATEWAY_PORT=$((PORT + 2))
mkdir -p "$OUT"

# 1. AIPerf in its own venv (its dependencies are not ours).
if [ ! -x "$AIPERF_HOME/bin/aiperf" ]; then
    python -m venv "$AIPERF_HOME"
    "$AIPERF_HOME/bin/pip" install --quiet "aiperf==$AIPERF_VERSION"
fi
"$AIPERF_HOME/bin/aiperf" --version | tee "$OUT/aiperf.version"

# 2. The one request in each tool's input format.
PROMPT="$PROMPT" MAX_TOKENS="$MAX_TOKENS" OUT="$OUT" python - <<'PY'
import json, os
prompt, out = os.environ["PROMPT"], os.environ["OUT"]
with open(f"{out}/aiperf_input.jsonl", "w") as f:
    f.write(json.dumps({"text": prompt}) + "\n")
with open(f"{out}/dataset.jsonl", "w") as f:
    f.write(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                        "max_tokens": int(os.environ["MAX_TOKENS"])}) + "\n")
PY

# 3. Triton and the gateway (loopback only).
server="" synthetic_dir="" REPO_LABEL="$REPO"
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; fi
    if [ -n "$synthetic_dir" ]; then rm -rf "$synthetic_dir"; fi
}
trap cleanup EXIT
if [ -n "${SYNTHETIC_RATE:-}" ]; then
    synthetic_dir="$(mktemp -d)"
    REPO="$synthetic_dir/repository" REPO_LABEL=synthetic
    medgemma-triton build synthetic --output "$REPO" --tokens-per-second "$SYNTHETIC_RATE" \
        --tokens-per-response "$TOKENS_PER_RESPONSE" >"$OUT/build.log" 2>&1
    TOKENIZER="${TOKENIZER:-.cache/test-artifacts/checkpoints/tiny}"
fi
"${SERVER_PIN[@]}" medgemma-triton serve "$REPO" --grpc-port "$PORT" --http-port "$((PORT - 1))" --metrics-port "$((PORT + 1))" \
    --openai-port "$GATEWAY_PORT" >"$OUT/server.log" 2>&1 &
server=$!
python -c "from medgemma_triton.client import MedGemmaClient as C; C('127.0.0.1:$PORT').wait_until_ready(timeout=300)"
until curl -sf "http://127.0.0.1:$GATEWAY_PORT/v1/models" >/dev/null; do sleep 1; done
MODEL="$(curl -s "http://127.0.0.1:$GATEWAY_PORT/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
if [ -z "${TOKENIZER:-}" ]; then
    TOKENIZER="$(python -c "
from medgemma_triton.repository.config import load_configs
from pathlib import Path
p = load_configs('$REPO')['medgemma'].parameters['checkpoint'].string_value
print((Path('$REPO') / 'medgemma' / '1' / p).resolve())")"
fi
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
    echo "no tokenizer.json in $TOKENIZER: set TOKENIZER to a checkpoint folder (the server's token counts are used)" >&2
    exit 1
fi

# 4. Alternating rounds: AIPerf, then throughput.py, at each concurrency.
for round in $(seq 1 "$ROUNDS"); do
    for c in ${CONCURRENCY//,/ }; do
        rm -rf "$OUT/aiperf-r$round-c$c" "$OUT/throughput-r$round-c$c"
        "${CLIENT_PIN[@]}" "$AIPERF_HOME/bin/aiperf" profile -m "$MODEL" --url "http://127.0.0.1:$GATEWAY_PORT" --endpoint-type chat \
            --streaming --input-file "$OUT/aiperf_input.jsonl" --custom-dataset-type single_turn \
            --tokenizer "$TOKENIZER" --use-server-token-count \
            --extra-inputs "max_completion_tokens:$MAX_TOKENS" --extra-inputs temperature:0 \
            --concurrency "$c" --request-count "$REQUESTS" --warmup-request-count "$WARMUP" \
            --output-artifact-dir "$OUT/aiperf-r$round-c$c" --ui-type none >"$OUT/aiperf-r$round-c$c.log" 2>&1
        "${CLIENT_PIN[@]}" python benchmarks/throughput.py --url "127.0.0.1:$PORT" --endpoint openai \
            --openai-url "http://127.0.0.1:$GATEWAY_PORT/v1" --dataset "$OUT/dataset.jsonl" \
            --concurrency "$c" --num-requests "$REQUESTS" --warmup-requests "$WARMUP" --metrics-url none \
            --no-plots --quiet --output-dir "$OUT/throughput-r$round-c$c" >"$OUT/throughput-r$round-c$c.log" 2>&1
        echo "round $round, concurrency $c: done"
    done
done

# 5. One table and, with SUMMARY, one JSON: each tool's own report and both recomputed from the
#    per-request records under one definition, medians over rounds.
python benchmarks/studies/aiperf_crosscheck_summary.py --out "$OUT" --rounds "$ROUNDS" --concurrency "$CONCURRENCY" \
    ${SUMMARY:+--json "$SUMMARY"} --setting "repository=$REPO_LABEL" \
    --setting "synthetic_tokens_per_second=${SYNTHETIC_RATE:-}" --setting "tokens_per_response=$TOKENS_PER_RESPONSE" \
    --setting "max_tokens=$MAX_TOKENS" --setting "requests=$REQUESTS" --setting "warmup=$WARMUP" \
    --setting "server_cpus=${SERVER_CPUS:-}" --setting "client_cpus=${CLIENT_CPUS:-}" | tee "$OUT/summary.md"
