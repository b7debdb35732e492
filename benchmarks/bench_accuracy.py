"""How far a quantized CPU path strays from float32, on the default model: teacher-forced greedy
agreement. float32 writes a greedy continuation of each chat prompt (tokenmill.bench's 16 chat
prompts, --tokens each); each quantization then predicts every one of those tokens from the
float32 prefix before it (max_tokens=1 on the prompt plus the prefix, prefix-cached), and
agreement is the share it predicts the same. Requests run one at a time, so every matmul has at
most a few rows and takes the quantized kernel, not the bfloat16 one a plan may keep for large
row counts (batched requests meet both).

Perplexity: the model's own weights, through each quantization's kernel at every row count (a
plan of that one kernel, so the bfloat16 large-M kernel a served plan keeps does not blur it),
and the KV cache's dtype the engine would choose with it on this CPU, read a fixed text: the
first --ppl-tokens tokens of Python's own documentation topics
(`pydoc_data.topics`, fixed for a Python version) in windows of --ppl-window tokens, each one
forward over the paged cache as a prefill; perplexity is exp(mean negative log-likelihood) of
every token after a window's first.

    .venv/bin/python benchmarks/bench_accuracy.py [--tokens 64] [--modes int4,int8,bf16]
        [--ppl-tokens 4096] [--ppl-window 512]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.bench.report import cpu_model
from tokenmill.bench.workload import CHAT_PROMPTS
from tokenmill.models.default import default_model_path
from tokenmill.models.loader import load_model
from tokenmill.runner.attention import TorchAttentionMetadata
from tokenmill.runner.cpu_linear import model_copy
from tokenmill.runner.linear_plan import CANDIDATES, LinearPlan, apply_plan, kv_cache_dtype

GREEDY = dict(temperature=0.0)


def prompts_ids(llm: LLM) -> list[list[int]]:
    from tokenmill.prompts import render_chat

    return [render_chat(llm.chat_template, llm.tokenizer, [{"role": "user", "content": p}])
            for p in CHAT_PROMPTS]


def fixed_text_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of Python's documentation topics, in sorted topic order."""
    from pydoc_data.topics import topics

    ids = tokenizer.encode("\n\n".join(topics[name] for name in sorted(topics)))
    if len(ids) < n:
        raise SystemExit(f"the fixed text has {len(ids)} tokens, fewer than {n}")
    return ids[:n]


@torch.inference_mode()
def perplexity(model, config, ids: list[int], window: int, kv_dtype: torch.dtype,
               block_size: int = 16) -> float:
    """exp(mean NLL) of each window's tokens after its first, every window one prefill over a
    fresh paged cache of `kv_dtype`."""
    blocks = -(-window // block_size)
    cache = torch.zeros(config.num_hidden_layers, 2, blocks, block_size,
                        config.num_key_value_heads, config.head_dim, dtype=kv_dtype)
    kv_caches = [(layer[0], layer[1]) for layer in cache]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start:start + window])  # [L]
        n = len(chunk)
        attn = TorchAttentionMetadata.build([n], [n], [list(range(blocks))], block_size,
                                            torch.device("cpu"))
        hidden = model(chunk, torch.arange(n), attn, kv_caches)  # [L, H]
        logits = model.compute_logits(hidden[:-1])  # [L-1, V] float32
        nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += n - 1
    return math.exp(nll / count)


def perplexities(modes: list[str], tokens: int, window: int) -> None:
    loaded = load_model(str(default_model_path()), torch.float32, torch.device("cpu"))
    ids = fixed_text_ids(loaded.tokenizer, tokens)
    results = {}
    for mode in ["none", *modes]:
        kernel = CANDIDATES[mode][0]  # the quantization's own kernel, at every row count
        model = model_copy(loaded.model)
        apply_plan(model, LinearPlan(mode, kernel, kernel, 0, {}))
        kv_dtype = kv_cache_dtype(mode, torch.float32)  # as the engine would choose it here
        results[mode] = perplexity(model, loaded.config, ids, window, kv_dtype)
        change = 100 * (results[mode] / results["none"] - 1)
        print(f"{mode} ({kernel} kernel, KV cache {str(kv_dtype)[6:]}): perplexity "
              f"{results[mode]:.3f} over {tokens} tokens in windows of {window} "
              f"({change:+.2f}% against float32)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default="int4,int8,bf16")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--ppl-window", type=int, default=512)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_model()}", flush=True)
    perplexities(args.modes.split(","), args.ppl_tokens, args.ppl_window)
    if args.skip_agreement:
        return
    options = dict(kv_cache_gib=0.5, max_model_len=1024)
    reference = LLM(quantization="none", **options)
    prompts = prompts_ids(reference)
    outs = reference.generate(prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True,
                                                      **GREEDY))
    continuations = [o.completions[0].token_ids for o in outs]
    del reference
    print(f"{len(prompts)} prompts x {args.tokens} greedy float32 tokens")
    for mode in args.modes.split(","):
        llm = LLM(quantization=mode, **options)
        forced = [prompt + cont[:i] for prompt, cont in zip(prompts, continuations)
                  for i in range(len(cont))]
        expected = [token for cont in continuations for token in cont]
        one = SamplingParams(max_tokens=1, **GREEDY)
        got = [llm.generate([ids], one)[0].completions[0].token_ids[0] for ids in forced]
        same = sum(a == b for a, b in zip(got, expected))
        free = SamplingParams(max_tokens=args.tokens, ignore_eos=True, **GREEDY)
        outs = [llm.generate([ids], free)[0] for ids in prompts]
        first = [next((i for i, t in enumerate(o.completions[0].token_ids) if t != c[i]),
                      len(c)) for o, c in zip(outs, continuations)]
        print(f"{mode}: teacher-forced greedy agreement {same}/{len(expected)} = "
              f"{100 * same / len(expected):.1f}%; free-running, identical for "
              f"{sum(first) / len(first):.1f} tokens on average "
              f"({sum(f == args.tokens for f in first)}/{len(first)} prompts all {args.tokens})",
              flush=True)
        del llm


if __name__ == "__main__":
    main()
