#!/usr/bin/env bash
# Instructions per request of one benchmark client, counted by valgrind (callgrind): a figure that does not move
# with the machine's load, for comparing two versions of the hot path where req/s is too noisy to tell 1-3 %.
#
#   benchmarks/instructions.sh [engine|raw] [N_SMALL N_LARGE]      (defaults: engine 2000 6000)
#
# Runs the client (benchmarks/clients.py, C=256, fresh cache) under callgrind at two sizes against a simulator on
# loopback and prints (large - small) / (N_LARGE - N_SMALL) for the event loop's thread and for the other threads
# together, so start-up and imports cancel out. Each run is about 50 times slower than normal: a minute or two.
# Seen on the 2-core development machine: raw aiohttp 411k on its only thread; the engine 472k at the end of
# session 3 (its cache written by a child process, not counted); 575k on 2026-12-01 with the cache written on the
# loop (549k + 23k on a worker thread when it was written there). Counts move with timing-dependent batching
# (a run under valgrind is about 50 times slower), so confirm a change with real runs too.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENT="${1:-engine}"
SMALL="${2:-2000}"
LARGE="${3:-6000}"
PYTHON="${PYTHON:-python}"
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed" >&2; exit 2; }
WORK="$(mktemp -d)"
trap 'kill "$SIM" 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$PYTHON" -m tcia_async.sim --port 0 --latency-ms 0 > "$WORK/sim.out" 2> "$WORK/sim.err" &
SIM=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/sim.out" 2>/dev/null && break; sleep 0.1; done
URL="$(sed -n 's/^listening on //p' "$WORK/sim.out" | head -1)"
[ -n "$URL" ] || { echo "instructions.sh: the simulator did not start" >&2; exit 1; }
export OPENAI_API_KEY=sk-instructions PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
count() {  # N -> "loop_thread_instructions other_threads_instructions"
    "$PYTHON" - "$1" "$WORK/req-$1.jsonl" <<'PY'
import sys, orjson
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "wb") as f:
    for i in range(n):
        f.write(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"model": "gpt-4o-mini", "max_tokens": 16,
                                       "messages": [{"role": "user", "content": f"count request {i}"}]}}) + b"\n")
PY
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$WORK/cg-$1.out" \
        "$PYTHON" benchmarks/clients.py "$CLIENT" --base-url "$URL" --input "$WORK/req-$1.jsonl" \
        --output "$WORK/out-$1.jsonl" -c 256 --cache "$WORK/cache-$1.db" > /dev/null 2> "$WORK/cg-$1.log"
    "$PYTHON" - "$WORK" "$1" <<'PY'
import glob, sys
work, n = sys.argv[1], sys.argv[2]
main = other = 0
for path in sorted(glob.glob(f"{work}/cg-{n}.out-*")):
    total = next((int(l.split()[1]) for l in open(path) if l.startswith(("summary:", "totals:"))), 0)
    if path.endswith("-01"):
        main = total
    else:
        other += total
print(main, other)
PY
}
read -r M1 O1 <<< "$(count "$SMALL")"
read -r M2 O2 <<< "$(count "$LARGE")"
D=$((LARGE - SMALL))
OTHER=$(( (O2 - O1) / D )); [ "$OTHER" -gt 0 ] || OTHER=0
echo "$CLIENT: $(( (M2 - M1) / D )) instructions/request on the event loop's thread, $OTHER on the others"
