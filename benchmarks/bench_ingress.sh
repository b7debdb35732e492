#!/bin/bash
# The ingress's place, measured (docs/SCALING.md, "The ingress as a deployment"): one process,
# the ingress in this process in front of 1 Ray Serve engine replica (--replicas 1), and the
# ingress as a Ray Serve deployment (--ingress-replicas 1), all up at once and measured in one
# interleaved `tokenmill bench` run. Run from the repository root; stops its servers at the end.
set -u
T=.venv/bin/tokenmill
OUT=${OUT:-/tmp/bench-ingress}
mkdir -p "$OUT"
trap 'pkill -TERM -f "tokenmill serve --no-auth --port 831"' EXIT
setsid $T serve --no-auth --port 8310 --max-model-len 1024 > "$OUT/one.log" 2>&1 &
setsid $T serve --no-auth --port 8311 --max-model-len 1024 --replicas 1 > "$OUT/replicas.log" 2>&1 &
wait_healthy() {
    for _ in $(seq 1 120); do curl -sf "localhost:$1/health" > /dev/null && return 0; sleep 2; done
    echo "the server on port $1 did not start: see $OUT" >&2; exit 1
}
wait_healthy 8310; wait_healthy 8311
setsid $T serve --no-auth --port 8312 --max-model-len 1024 --replicas 1 --ingress-replicas 1 \
    > "$OUT/ingress.log" 2>&1 &
wait_healthy 8312
lscpu | grep "Model name"
$T bench --url http://127.0.0.1:8310 --compare replicas-1=http://127.0.0.1:8311 \
    --compare ingress-deployment=http://127.0.0.1:8312 --concurrency 1,8,32 \
    --input-len 128 --output-len 64
