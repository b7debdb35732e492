#!/usr/bin/env bash
# The serving comparison of docs/BENCHMARKS.md in one run: tokenmill (its default, auto, and
# float32), llama.cpp's llama-server on the same GGUF and vLLM's CPU build on the same weights
# as a Hugging Face checkpoint, through `tokenmill bench`; then the shared-prefix workload
# (prefix cache on and off) and the long-prompt workload (chunked prefill at 512 tokens a step
# against one 4,096-token step). Every server listens on 127.0.0.1 and is stopped at the end.
#
#   LLAMA_SERVER=/path/to/llama-server VLLM_PYTHON=/path/to/vllm-venv/bin/python \
#   HF_DIR=/path/to/checkpoint OUT=benchmarks/results benchmarks/compare_peers.sh
#
# How the peers were built and the checkpoint saved: docs/BENCHMARKS.md. Nothing of them is in
# this repository. Results (JSON, the plot, each server's log) go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_SERVER:?the llama-server binary}" "${VLLM_PYTHON:?the python of the vLLM venv}"
: "${HF_DIR:?the default model saved as a Hugging Face checkpoint}"
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
GGUF=$(.venv/bin/python -c 'from tokenmill.models.default import default_model_path as p; print(p())')
T=.venv/bin/tokenmill
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

start() {  # NAME PORT COMMAND...: start a server, logging to $OUT/NAME.log
    local name=$1 port=$2; shift 2
    "$@" >"$OUT/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && { echo "$name up on $port"; return; }
        sleep 1
    done
    echo "$name did not come up: $OUT/$name.log" >&2
    exit 1
}

failed() { echo "(some requests failed: see the table's errors column)"; }

LEN=4608  # every server's context: the long prompt (4,096 tokens) and its output fit
start tokenmill 8203 $T serve --no-auth --port 8203 --max-model-len $LEN
start tokenmill-fp32 8202 $T serve --no-auth --port 8202 --max-model-len $LEN --quantization none
start llama.cpp 8201 "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 8201 -t 2 -np 8 \
    -c $((8 * LEN)) --jinja
(cd /tmp && VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 \
    exec "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" \
    --dtype bfloat16 --max-model-len $LEN --host 127.0.0.1 --port 8204) >"$OUT/vllm.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 900); do curl -sf http://127.0.0.1:8204/health >/dev/null && break; sleep 1; done

$T bench --url http://127.0.0.1:8203 --compare tokenmill-fp32=http://127.0.0.1:8202 \
    --compare llama.cpp=http://127.0.0.1:8201 --compare vllm=http://127.0.0.1:8204 \
    --concurrency 1,8,32 --input-len 128 --output-len 96 \
    --output "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt" || failed

kill "${PIDS[1]}"  # float32 is done; the next two servers take its place
start tokenmill-no-prefix-cache 8205 $T serve --no-auth --port 8205 --max-model-len $LEN \
    --no-prefix-caching
$T bench --url http://127.0.0.1:8203 --compare no-prefix-cache=http://127.0.0.1:8205 \
    --dataset shared-prefix --prefix-len 1000 --input-len 32 --output-len 32 \
    --concurrency 1 --num-prompts 16 --output "$OUT/shared-prefix.json" \
    | tee "$OUT/shared-prefix.txt" || failed

kill "${PIDS[-1]}"
start tokenmill-unchunked 8206 $T serve --no-auth --port 8206 --max-model-len $LEN \
    --max-num-batched-tokens $LEN
$T bench --url http://127.0.0.1:8203 --compare unchunked=http://127.0.0.1:8206 \
    --compare llama.cpp=http://127.0.0.1:8201 --compare vllm=http://127.0.0.1:8204 \
    --dataset long-prompt --long-len 4096 --long-every 8 --input-len 128 --output-len 96 \
    --concurrency 8 --num-prompts 32 --output "$OUT/long-prompt.json" \
    | tee "$OUT/long-prompt.txt" || failed
