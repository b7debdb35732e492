"""Every linear of the default model (SmolLM2-135M: 30 layers of q, k, v, o, gate, up, down, and
the tied 49152 x 576 LM head) through each CPU kernel PyTorch offers, at M rows: what a decode
step (M = the running requests) or a prefill chunk costs in matmuls alone. Random weights of the
model's shapes; ms per pass over all of them, median of --repeat passes after a warm-up.

    .venv/bin/python benchmarks/bench_linears.py [--rows 1,8,32,128] [--threads 2]

Kernels: float32 `F.linear` (MKL), float32 oneDNN-prepacked (runner/cpu_linear.py), bfloat16
`F.linear` (oneDNN; AMX where the CPU has it), int8 weight-only `_weight_int8pack_mm` (per
output channel scales) and int4 weight-only `_weight_int4pack_mm_for_cpu` (groups of 32), both
with float32 activations.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokenmill.runner.cpu_linear import PackedLinear
from tokenmill.runner.quant_linear import Int4Linear, Int8Linear

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
          (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * LAYERS + [
    (VOCAB, HIDDEN)]


def kernels(weights: list[torch.Tensor]) -> dict:
    """name -> (prepare x, list of callables y = f(x))."""
    bf16 = [w.to(torch.bfloat16) for w in weights]
    packed = [PackedLinear(w) for w in weights]
    int8 = [Int8Linear.quantize(w) for w in weights]
    int4 = [Int4Linear.quantize(w) for w in weights]
    return {
        "fp32 F.linear": (lambda x: x, [lambda x, w=w: F.linear(x, w) for w in weights]),
        "fp32 oneDNN packed": (lambda x: x, packed),
        "bf16 F.linear": (lambda x: x.to(torch.bfloat16),
                          [lambda x, w=w: F.linear(x, w) for w in bf16]),
        "int8 weight-only": (lambda x: x, int8),
        "int4 weight-only": (lambda x: x, int4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,32,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    rows = [int(r) for r in args.rows.split(",")]
    table = {}
    with torch.inference_mode():
        for name, (prepare, fns) in kernels(weights).items():
            for m in rows:
                x = prepare(torch.randn(m, HIDDEN))
                xi = prepare(torch.randn(m, INTERMEDIATE))
                inputs = [xi if fn_k == INTERMEDIATE else x for _, fn_k in SHAPES]
                for fn, inp in zip(fns, inputs):  # warm-up: each shape's primitives built
                    fn(inp)
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    for fn, inp in zip(fns, inputs):
                        fn(inp)
                    times.append(time.perf_counter() - start)
                table[(name, m)] = statistics.median(times) * 1000
                print(f"{name:<20} M={m:<4} {table[(name, m)]:8.1f} ms", flush=True)
    print()
    print("| M | " + " | ".join(name for name, _ in kernels_names(table)) + " |")
    print("|---" * (1 + len(kernels_names(table))) + "|")
    for m in rows:
        print(f"| {m} | " + " | ".join(f"{table[(name, m)]:.1f}"
                                      for name, _ in kernels_names(table)) + " |")


def kernels_names(table: dict) -> list[tuple[str, None]]:
    return [(name, None) for name in dict.fromkeys(name for name, _ in table)]


if __name__ == "__main__":
    main()
