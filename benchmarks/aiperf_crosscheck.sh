#!/usr/bin/env bash
# Cross-check of `throughput.py --endpoint openai` against NVIDIA's AIPerf (PyPI `aiperf`, the
# successor to genai-perf), both through the OpenAI-compatible gateway in front of one served
# repository (default: the `dev` checkpoint), the same request, alternating rounds. See
# docs/benchmark-crosscheck.md for the results.
#
# Both send one chat request (PROMPT) to /v1/chat/completions, streamed, temperature 0,
# MAX_TOKENS new tokens, with the server's token counts (include_usage; AIPerf
# --use-server-token-count). TTFT p50, ITL p50 (genai-perf's definition in both: (last content time -
# first) / (output tokens - 1)) and output tokens/s are compared.
#
# Environment: REPO (a built repository; default the test suite's dev-fp32), OUT, PORT (gRPC; HTTP =
#   PORT-1, metrics = PORT+1, gateway = PORT+2), CONCURRENCY (1,4), ROUNDS (3), REQUESTS (16),
#   MAX_TOKENS (32), AIPERF_VERSION (0.13.0; installed in its own venv under .cache),
#   SERVER_CPUS / CLIENT_CPUS (taskset CPU lists, e.g. 0 and 1: the server and the gateway on some
#   cores, each client on others, so a client's own CPU use cannot slow the server it measures;
#   default: unpinned).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

REPO="${REPO:-.cache/test-artifacts/repositories/dev-fp32}"
OUT="${OUT:-results/aiperf-crosscheck}"
PORT="${PORT:-8601}"
CONCURRENCY="${CONCURRENCY:-1,4}"
ROUNDS="${ROUNDS:-3}"
REQUESTS="${REQUESTS:-16}"
MAX_TOKENS="${MAX_TOKENS:-32}"
AIPERF_VERSION="${AIPERF_VERSION:-0.13.0}"
PROMPT="${PROMPT:-Describe the typical findings of a normal frontal chest X-ray in two sentences.}"
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
"${SERVER_PIN[@]}" medgemma-triton serve "$REPO" --grpc-port "$PORT" --http-port "$((PORT - 1))" --metrics-port "$((PORT + 1))" \
    --openai-port "$GATEWAY_PORT" >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
python -c "from medgemma_triton.client import MedGemmaClient as C; C('127.0.0.1:$PORT').wait_until_ready(timeout=300)"
until curl -sf "http://127.0.0.1:$GATEWAY_PORT/v1/models" >/dev/null; do sleep 1; done
MODEL="$(curl -s "http://127.0.0.1:$GATEWAY_PORT/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
CHECKPOINT="$(python -c "
from medgemma_triton.repository_config import load_configs
from pathlib import Path
p = load_configs('$REPO')['medgemma'].parameters['checkpoint'].string_value
print((Path('$REPO') / 'medgemma' / '1' / p).resolve())")"

# 4. Alternating rounds: AIPerf, then throughput.py, at each concurrency.
for round in $(seq 1 "$ROUNDS"); do
    for c in ${CONCURRENCY//,/ }; do
        rm -rf "$OUT/aiperf-r$round-c$c" "$OUT/throughput-r$round-c$c"
        "${CLIENT_PIN[@]}" "$AIPERF_HOME/bin/aiperf" profile -m "$MODEL" --url "http://127.0.0.1:$GATEWAY_PORT" --endpoint-type chat \
            --streaming --input-file "$OUT/aiperf_input.jsonl" --custom-dataset-type single_turn \
            --tokenizer "$CHECKPOINT" --use-server-token-count \
            --extra-inputs "max_completion_tokens:$MAX_TOKENS" --extra-inputs temperature:0 \
            --concurrency "$c" --request-count "$REQUESTS" --warmup-request-count 2 \
            --output-artifact-dir "$OUT/aiperf-r$round-c$c" --ui-type none >"$OUT/aiperf-r$round-c$c.log" 2>&1
        "${CLIENT_PIN[@]}" python benchmarks/throughput.py --url "127.0.0.1:$PORT" --endpoint openai \
            --openai-url "http://127.0.0.1:$GATEWAY_PORT/v1" --dataset "$OUT/dataset.jsonl" \
            --concurrency "$c" --num-requests "$REQUESTS" --warmup-requests 2 --metrics-url none \
            --no-plots --quiet --output-dir "$OUT/throughput-r$round-c$c" >"$OUT/throughput-r$round-c$c.log" 2>&1
        echo "round $round, concurrency $c: done"
    done
done

# 5. One table: TTFT p50, ITL p50, output tokens/s, each tool's own report, medians over rounds.
OUT="$OUT" ROUNDS="$ROUNDS" CONCURRENCY="$CONCURRENCY" python - <<'PY' | tee "$OUT/summary.md"
import json, os, statistics

out, rounds = os.environ["OUT"], int(os.environ["ROUNDS"])
print("| concurrency | metric | AIPerf (median; rounds) | throughput.py --endpoint openai (median; rounds) | difference |")
print("|---|---|---|---|---|")
for c in os.environ["CONCURRENCY"].split(","):
    ai, tp = {}, {}
    for r in range(1, rounds + 1):
        a = json.load(open(f"{out}/aiperf-r{r}-c{c}/profile_export_aiperf.json"))
        ai.setdefault("TTFT p50 (ms)", []).append(a["time_to_first_token"]["p50"])
        ai.setdefault("ITL p50 (ms)", []).append(a["inter_token_latency"]["p50"])
        ai.setdefault("output tokens/s", []).append(a["output_token_throughput"]["avg"])
        (point,) = json.load(open(f"{out}/throughput-r{r}-c{c}/throughput.json"))["points"]
        m = point["metrics"]
        tp.setdefault("TTFT p50 (ms)", []).append(m["ttft_ms"]["p50"])
        tp.setdefault("ITL p50 (ms)", []).append(m["itl_ms"]["p50"])
        tp.setdefault("output tokens/s", []).append(m["output_token_throughput"])
    for metric in ai:
        a, t = statistics.median(ai[metric]), statistics.median(tp[metric])
        print(f"| {c} | {metric} | {a:.1f} ({', '.join(f'{v:.1f}' for v in ai[metric])}) | "
              f"{t:.1f} ({', '.join(f'{v:.1f}' for v in tp[metric])}) | {100 * (t / a - 1):+.1f}% |")
PY
