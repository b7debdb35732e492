"""Decode tokens/s of one engine at --tensor-parallel-size K (a measurement, not a test).

    .venv/bin/python benchmarks/bench_tensor_parallel.py make /tmp/llama-tp  # random weights
    .venv/bin/python benchmarks/bench_tensor_parallel.py /tmp/llama-tp 1 1 8  # K=1, batch 1, 8
    .venv/bin/python benchmarks/bench_tensor_parallel.py /tmp/llama-tp 2 1 8  # K=2

`make` writes a randomly initialised Llama-shaped checkpoint whose heads 2 divides (the default
model's 9 query and 3 KV heads take only K = 3) with the default model's tokenizer. Each run uses
one torch thread per rank (`num_threads` = K), float32, quantization none: B requests of a
~100-token prompt are prefilled, then DECODE_STEPS decode steps of B rows are timed.
"""

import sys
import time
from pathlib import Path

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.models.default import default_model_path
from tokenmill.models.gguf_loader import load_gguf_config_and_tokenizer
from tokenmill.sampling_params import SamplingParams

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024,
             tie_word_embeddings=True)
PROMPT_TOKENS = 100
DECODE_STEPS = 32


def make(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_gguf_config_and_tokenizer(default_model_path())[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **SHAPE)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {path}")


def bench(path: Path, k: int, batches: list[int]) -> None:
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu",
                                    max_model_len=512, kv_cache_gib=0.5, num_threads=k,
                                    max_num_batched_tokens=1024,
                                    tensor_parallel_size=k, quantization="none"))
    try:
        for b in batches:
            params = SamplingParams(temperature=0.0, max_tokens=DECODE_STEPS + 1,
                                    ignore_eos=True)
            for i in range(b):
                ids = torch.randint(100, 40000, (PROMPT_TOKENS,),
                                    generator=torch.Generator().manual_seed(i)).tolist()
                engine.add_request(f"{b}-{i}", ids, params)
            engine.step()  # the prefills (and each request's first token)
            start = time.perf_counter()
            steps = 0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            elapsed = time.perf_counter() - start
            print(f"K={k} B={b}: {steps} decode steps, {elapsed / steps * 1e3:.1f} ms/step, "
                  f"{b * steps / elapsed:.1f} tokens/s")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        bench(Path(sys.argv[1]), int(sys.argv[2]), [int(b) for b in sys.argv[3:]] or [1, 8])
