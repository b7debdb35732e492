"""Offline engine benchmark on the default model, with transformers' generate as the baseline.

Measures, in one run and on the same weights (float32 on CPU):
  - batch-1 decode tokens/s (one request, greedy, ignore_eos)
  - aggregate output tokens/s with 16 requests of different lengths in flight, joining and
    leaving (closed loop, 48 requests), and of one wave of 16 that joins in two halves and drains
  - prefill tokens/s (one long prompt, time to first token)
  - peak RSS of the process
  - transformers' generate: batch-1 decode and a static batch of 16 (left-padded)

Usage: python benchmarks/bench_offline.py [--threads N] [--decode-tokens 128] [--skip-hf]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.models.default import default_model_path
from tokenmill.sampling_params import SamplingParams


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drain(engine: LLMEngine) -> tuple[int, float | None]:
    """Step to completion; returns (output tokens, time of the first output token)."""
    total, first = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            total += len(out.new_token_ids)
            if first is None and out.new_token_ids:
                first = time.perf_counter()
    return total, first


def bench_batch1(engine: LLMEngine, prompt: list[int], n_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
    engine.add_request("b1", prompt, params)
    total, first = drain(engine)
    return (total - 1) / (time.perf_counter() - first)


def bench_concurrent(engine: LLMEngine, prompts: list[list[int]], n_tokens: int) -> float:
    """16 requests with output lengths spread over [n/2, 3n/2]; half join after a few steps."""
    lengths = [n_tokens // 2 + (n_tokens * i) // (len(prompts) - 1) for i in range(len(prompts))]
    start = time.perf_counter()
    half = len(prompts) // 2
    for i in range(half):
        engine.add_request(f"c{i}", prompts[i], SamplingParams(
            temperature=0.0, max_tokens=lengths[i], ignore_eos=True))
    total = 0
    for _ in range(4):
        total += sum(len(o.new_token_ids) for o in engine.step())
    for i in range(half, len(prompts)):
        engine.add_request(f"c{i}", prompts[i], SamplingParams(
            temperature=0.0, max_tokens=lengths[i], ignore_eos=True))
    total += drain(engine)[0]
    return total / (time.perf_counter() - start)


def bench_closed_loop(engine: LLMEngine, prompts: list[list[int]], n_tokens: int,
                      concurrency: int = 16, num_requests: int = 48) -> float:
    """vLLM's --max-concurrency shape: `concurrency` requests in flight; as one leaves, the next
    joins. Output lengths cycle over [n/2, 3n/2], so requests join and leave at every step."""
    lengths = [n_tokens // 2 + (n_tokens * (i * 7 % 16)) // 15 for i in range(num_requests)]
    start, total, next_id, in_flight = time.perf_counter(), 0, 0, 0
    while next_id < num_requests or engine.has_unfinished_requests():
        while in_flight < concurrency and next_id < num_requests:
            engine.add_request(f"q{next_id}", prompts[next_id % len(prompts)], SamplingParams(
                temperature=0.0, max_tokens=lengths[next_id], ignore_eos=True))
            next_id, in_flight = next_id + 1, in_flight + 1
        for out in engine.step():
            total += len(out.new_token_ids)
            in_flight -= out.finished
    return total / (time.perf_counter() - start)


def bench_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.add_request("pf", prompt, SamplingParams(temperature=0.0, max_tokens=1))
    drain(engine)
    return len(prompt) / (time.perf_counter() - start)


def bench_hf(path, prompts: list[list[int]], n_tokens: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]])
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        batch1 = n_tokens / (time.perf_counter() - t)
        width = max(len(p) for p in prompts)
        pad = 2
        batch = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t = time.perf_counter()
        model.generate(batch, attention_mask=mask, max_new_tokens=n_tokens,
                       min_new_tokens=n_tokens, do_sample=False, pad_token_id=pad)
        static16 = len(prompts) * n_tokens / (time.perf_counter() - t)
    return batch1, static16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {path.name}")
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu",
                                    max_model_len=2048, kv_cache_gib=1.0))
    tok = engine.tokenizer
    topics = ["the sea", "mountains", "a robot", "coffee", "rain", "a library", "the moon",
              "bicycles", "music", "winter", "cities", "a garden", "the desert", "trains",
              "friendship", "a lighthouse"]
    prompts = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Write a story about {t}." + " Be vivid." * (i % 5)}],
        tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        for i, t in enumerate(topics)]
    long_prompt = (prompts[0] * (args.prefill_tokens // len(prompts[0]) + 1))[:args.prefill_tokens]

    bench_batch1(engine, prompts[1], 8)  # warm-up
    engine.scheduler.block_manager.reset_prefix_cache()
    results = {
        "batch-1 decode tok/s": bench_batch1(engine, prompts[0], args.decode_tokens),
        "16 in flight, closed loop, output tok/s": bench_closed_loop(engine, prompts,
                                                                     args.decode_tokens),
        "16 staggered then draining, output tok/s": bench_concurrent(engine, prompts,
                                                                     args.decode_tokens),
        f"prefill tok/s ({args.prefill_tokens}-token prompt)": bench_prefill(engine, long_prompt),
    }
    results["peak RSS MiB (tokenmill)"] = peak_rss_mib()
    if not args.skip_hf:
        hf1, hf16 = bench_hf(path, prompts, args.decode_tokens)
        results["transformers batch-1 decode tok/s"] = hf1
        results["transformers static batch 16 tok/s"] = hf16
    for name, value in results.items():
        print(f"{name:45s} {value:8.1f}")


if __name__ == "__main__":
    main()
