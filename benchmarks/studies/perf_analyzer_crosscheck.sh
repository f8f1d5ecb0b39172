#!/usr/bin/env bash
# Cross-check of benchmarks/throughput.py against an independent client: NVIDIA's perf_analyzer
# (C++, from the tritonclient==2.51.0 wheel), on the served `tiny` checkpoint, same request, same
# concurrency. See docs/benchmark-crosscheck.md for the results and how to read them.
#
# Both tools send byte-identical requests to the `medgemma` model over one gRPC stream each:
#   messages = the chat JSON the project's client sends for PROMPT, max_tokens = MAX_TOKENS,
#   temperature = 0 (greedy: every request generates the same tokens), stream = true.
# Rounds alternate perf_analyzer / throughput.py so run-to-run noise shows next to the gap.
#
# Environment: CHECKPOINT, OUT (results dir), PORT (gRPC; HTTP=PORT-1, metrics=PORT+1),
#   CONCURRENCY (default 1,2), MAX_TOKENS (32), ROUNDS (2), PA_COUNT (perf_analyzer's requests
#   per measurement window), TP_REQUESTS (throughput.py's measured requests per point).
#   SYNTHETIC_RATE=N: serve the synthetic deployment instead (no model: N tokens/s per request,
#   TOKENS_PER_RESPONSE per response, default 1), to measure the clients alone:
#     SYNTHETIC_RATE=1000 TOKENS_PER_RESPONSE=4 CONCURRENCY=1,8,32,64 bash benchmarks/studies/perf_analyzer_crosscheck.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate

CHECKPOINT="${CHECKPOINT:-.cache/test-artifacts/checkpoints/tiny}"
OUT="${OUT:-results/crosscheck}"
PORT="${PORT:-8201}"
CONCURRENCY="${CONCURRENCY:-1,2}"
MAX_TOKENS="${MAX_TOKENS:-32}"
ROUNDS="${ROUNDS:-2}"
PA_COUNT="${PA_COUNT:-40}"
TP_REQUESTS="${TP_REQUESTS:-120}"
PROMPT="${PROMPT:-Describe the typical findings of a normal frontal chest X-ray in two sentences.}"
SYNTHETIC_RATE="${SYNTHETIC_RATE:-}"
TOKENS_PER_RESPONSE="${TOKENS_PER_RESPONSE:-1}"
if [ -n "$SYNTHETIC_RATE" ]; then
    REPO="${REPO:-.cache/crosscheck/repo-synthetic-$SYNTHETIC_RATE-$TOKENS_PER_RESPONSE}"
else
    REPO="${REPO:-.cache/crosscheck/repo-tiny}"
fi
PA_HOME=.cache/perf_analyzer-2.51.0
mkdir -p "$OUT"

# 1. perf_analyzer from the tritonclient 2.51.0 wheel, outside the venv (its protobuf pin
#    conflicts with ours); its libb64/libcudart are pytriton's bundled copies, under their sonames.
if [ ! -x "$PA_HOME/bin/perf_analyzer" ]; then
    mkdir -p "$PA_HOME/wheel" "$PA_HOME/bin" "$PA_HOME/lib"
    pip download --no-deps --quiet tritonclient==2.51.0 -d "$PA_HOME/wheel"
    python -m zipfile -e "$PA_HOME"/wheel/tritonclient-2.51.0-*.whl "$PA_HOME/unpacked"
    install -m 755 "$PA_HOME/unpacked/tritonclient-2.51.0.data/data/bin/perf_analyzer" "$PA_HOME/bin/"
fi
PYTRITON_LIBS="$(python -c 'import glob, sysconfig; print(glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia_pytriton.libs")[0])')"
ln -sf "$PYTRITON_LIBS"/libb64-*.so.0d "$PA_HOME/lib/libb64.so.0d"
ln -sf "$PYTRITON_LIBS"/libcudart-*.so.12* "$PA_HOME/lib/libcudart.so.12"
PERF_ANALYZER=(env "LD_LIBRARY_PATH=$PWD/$PA_HOME/lib:$PYTRITON_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$PA_HOME/bin/perf_analyzer")
"${PERF_ANALYZER[@]}" --version | tee "$OUT/perf_analyzer.version"

# 2. The one request, in each tool's input format: a JSONL line for throughput.py --dataset and
#    perf_analyzer --input-data JSON holding the exact `messages` string the client would send.
PROMPT="$PROMPT" MAX_TOKENS="$MAX_TOKENS" OUT="$OUT" python - <<'EOF'
import json, os
from medgemma_triton.client.api import build_request

prompt, max_tokens, out = os.environ["PROMPT"], int(os.environ["MAX_TOKENS"]), os.environ["OUT"]
messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
request = build_request(messages, stream=True, max_tokens=max_tokens, temperature=0.0)
with open(f"{out}/dataset.jsonl", "w") as f:
    f.write(json.dumps({"messages": messages, "max_tokens": max_tokens}) + "\n")
with open(f"{out}/perf_analyzer_input.json", "w") as f:
    json.dump({"data": [{
        "messages": [request.messages_json],
        "max_tokens": [max_tokens],
        "temperature": [0.0],
        "stream": [True],
    }]}, f, indent=1)
print("inputs sent by the project's client:", sorted(i.name() for i in request.inputs))
EOF

# 3. Serve the checkpoint (loopback only).
if [ -n "$SYNTHETIC_RATE" ]; then
    medgemma-triton build synthetic --output "$REPO" --tokens-per-second "$SYNTHETIC_RATE" \
        --tokens-per-response "$TOKENS_PER_RESPONSE"
else
    [ -d "$REPO" ] || medgemma-triton build cpu --checkpoint "$CHECKPOINT" --output "$REPO"
fi
medgemma-triton serve "$REPO" --grpc-port "$PORT" --http-port "$((PORT - 1))" --metrics-port "$((PORT + 1))" \
    >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
python -c "from medgemma_triton.client import MedGemmaClient as C; C('127.0.0.1:$PORT').wait_until_ready(timeout=300)"

# 4. Both tools, alternating. perf_analyzer: closed loop, count windows of PA_COUNT requests,
#    repeated until 3 consecutive windows agree within 10%, at most 20 windows (it has no warm-up option; the windows
#    before the stable three are its warm-up); latency = request sent -> last response received.
#    throughput.py: closed loop, 4 unmeasured requests, then TP_REQUESTS measured ones.
#    /usr/bin/time records each client's own CPU time: both share the machine with the server.
CPU_TIME=(/usr/bin/time -f "%e %U %S")
for round in $(seq 1 "$ROUNDS"); do
    rm -rf "$OUT/perf_analyzer-r$round".* "$OUT/perf_analyzer-r$round"-* "$OUT/throughput-r$round"*  # perf_analyzer won't overwrite
    : >"$OUT/perf_analyzer-r$round.log"
    for c in ${CONCURRENCY//,/ }; do  # one run per concurrency: the list need not be evenly spaced
        "${CPU_TIME[@]}" -a -o "$OUT/perf_analyzer-r$round.cpu" "${PERF_ANALYZER[@]}" -m medgemma -i grpc -u "127.0.0.1:$PORT" --streaming --async \
            --input-data "$OUT/perf_analyzer_input.json" \
            --concurrency-range "$c:$c:1" \
            --measurement-mode count_windows --measurement-request-count "$PA_COUNT" \
            --stability-percentage 10 --max-trials 20 \
            -f "$OUT/perf_analyzer-r$round-c$c.csv" --profile-export-file "$OUT/perf_analyzer-r$round-c$c.profile.json" \
            2>&1 | tee -a "$OUT/perf_analyzer-r$round.log"
    done
    "${CPU_TIME[@]}" -o "$OUT/throughput-r$round.cpu" python benchmarks/throughput.py --url "127.0.0.1:$PORT" --dataset "$OUT/dataset.jsonl" \
        --concurrency "$CONCURRENCY" --num-requests "$TP_REQUESTS" --warmup-requests 4 \
        --no-plots --quiet --output-dir "$OUT/throughput-r$round" 2>&1 | tee "$OUT/throughput-r$round.log"
done

# 5. One table: each tool's own numbers, and perf_analyzer's raw records (profile export)
#    re-computed with throughput.py's definitions (duration = first start -> last response).
OUT="$OUT" ROUNDS="$ROUNDS" python - <<'PY' | tee "$OUT/summary.md"
import glob, json, os, re, statistics

out, rounds = os.environ["OUT"], int(os.environ["ROUNDS"])
rows = {}  # (concurrency, tool) -> [(req/s, mean e2e ms)], one per round
tokens = {}  # concurrency -> output tokens per request (the same request every time: the same for both tools)
PA, PA_RAW, TP = "perf_analyzer (its report)", "perf_analyzer records, throughput.py formulas", "throughput.py"

def add(c, tool, rps, e2e_ms):
    rows.setdefault((int(c), tool), []).append((rps, e2e_ms))

for r in range(1, rounds + 1):
    # perf_analyzer's report over its 3 stable windows: "Throughput: X infer/sec" and
    # "Avg latency: N usec" (the -f CSV leaves the average out: it splits it into components)
    text = open(f"{out}/perf_analyzer-r{r}.log").read()
    stable = set()
    for block in text.split("Request concurrency: ")[1:]:
        c = int(block.split()[0])
        rps, latency = (re.search(pattern, block) for pattern in (
            r"\n\s+Throughput: ([0-9.]+) infer/sec", r"Avg latency: ([0-9]+) usec"))
        if rps is None or latency is None:
            print(f"round {r}, concurrency {c}: perf_analyzer reported no stable measurement\n")
            continue
        add(c, PA, float(rps.group(1)), float(latency.group(1)) / 1e3)
        stable.add(c)
    # its raw records (every window is exported): those ending in the last 3 windows, as reported,
    # with throughput.py's definitions (duration = first request start -> last response)
    experiments = [e for path in sorted(glob.glob(f"{out}/perf_analyzer-r{r}-c*.profile.json"))
                   for e in json.load(open(path))["experiments"]]
    for experiment in experiments:
        if experiment["experiment"]["value"] not in stable:
            continue  # no stable report to mirror
        bounds = experiment["window_boundaries"]
        lo, hi = bounds[max(0, len(bounds) - 4)], bounds[-1]
        reqs = [q for q in experiment["requests"] if q["response_timestamps"] and lo <= q["response_timestamps"][-1] <= hi]
        start = min(q["timestamp"] for q in reqs)
        end = max(q["response_timestamps"][-1] for q in reqs)
        e2e = [(q["response_timestamps"][-1] - q["timestamp"]) / 1e6 for q in reqs]
        add(experiment["experiment"]["value"], PA_RAW, len(reqs) / ((end - start) / 1e9), statistics.mean(e2e))
    # throughput.py's report
    report = json.load(open(f"{out}/throughput-r{r}/throughput.json"))
    for point in report["points"]:
        add(point["value"], TP, point["metrics"]["request_throughput"], point["metrics"]["e2e_ms"]["mean"])
        tokens[int(point["value"])] = point["metrics"]["total_output_tokens"] / point["metrics"]["completed"]

mean = statistics.mean
cpu = {}  # tool -> cores the client process kept busy, (user + sys) / elapsed, per round
for r in range(1, rounds + 1):
    for tool, name in ((PA, "perf_analyzer"), (TP, "throughput.py")):
        runs = [line.split() for line in open(f"{out}/{name.split('.')[0]}-r{r}.cpu") if re.match(r"^[0-9.]+ [0-9.]+ [0-9.]+$", line.strip())]
        elapsed, user, system = (sum(float(run[i]) for run in runs) for i in range(3))
        cpu.setdefault(tool, []).append((user + system) / elapsed)
print("| concurrency | tool | request throughput (req/s) | output tokens/s | mean e2e latency (ms) | per round (req/s; ms) |")
print("|---|---|---|---|---|---|")
for (c, tool), values in sorted(rows.items()):
    each = ", ".join(f"{a:.2f}; {b:.1f}" for a, b in values)
    rps = mean(v[0] for v in values)
    print(f"| {c} | {tool} | {rps:.2f} | {rps * tokens.get(c, float('nan')):.0f} | {mean(v[1] for v in values):.1f} | {each} |")
print()
print("| concurrency | throughput.py vs perf_analyzer: request throughput | mean e2e latency |")
print("|---|---|---|")
for c in sorted({c for c, tool in rows if tool == TP} & {c for c, tool in rows if tool == PA}):
    pa, tp = rows[(c, PA)], rows[(c, TP)]
    d_rps = 100 * (mean(v[0] for v in tp) / mean(v[0] for v in pa) - 1)
    d_e2e = 100 * (mean(v[1] for v in tp) / mean(v[1] for v in pa) - 1)
    print(f"| {c} | {d_rps:+.1f}% | {d_e2e:+.1f}% |")
print()
print("| client process | CPU cores busy while it ran ((user + sys) / wall, whole run) |")
print("|---|---|")
for tool, values in cpu.items():
    print(f"| {tool} | {mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)}) |")
PY
