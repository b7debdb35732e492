"""Does torch.compile of the decode step pay on this CPU? (a measurement, not a test)

    Q=int4 .venv/bin/python benchmarks/bench_compile.py

Decode steps of the default model through ModelRunner (as benchmarks/bench_decode.py), first
eager, then with every decoder layer compiled by Inductor (dynamic shapes; attention left eager:
its index tensors change every step). Prints each batch size's first, compiling steps' time and
the step times after.
"""

import os
import time

import torch

from bench_decode import bench
from tokenmill.config import CacheConfig
from tokenmill.models.default import default_model_path
from tokenmill.models.loader import load_model
from tokenmill.runner import attention
from tokenmill.runner.linear_plan import kv_cache_dtype
from tokenmill.runner.model_runner import ModelRunner

BATCHES = (1, 8, 32)


def main() -> None:
    torch.set_num_threads(2)
    quantization = os.environ.get("Q", "int4")
    loaded = load_model(str(default_model_path()), torch.float32, torch.device("cpu"))
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=2048),
                         torch.device("cpu"), torch.float32, quantization=quantization,
                         kv_dtype=kv_cache_dtype(quantization, torch.float32))
    print("eager")
    for batch in BATCHES:
        bench(runner, batch)
    for backend in (attention.TorchAttentionMetadata, attention.CpuPagedAttentionMetadata):
        backend.forward = torch.compiler.disable(backend.forward)
    for layer in runner.model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    print("compiled decoder layers")
    for batch in BATCHES:
        start = time.perf_counter()
        bench(runner, batch, steps=3)
        print(f"  batch {batch}: first steps, compiling, {time.perf_counter() - start:.1f} s")
    for batch in BATCHES:
        bench(runner, batch)


if __name__ == "__main__":
    main()
