"""How far a quantized CPU path strays from float32, on the default model: teacher-forced greedy
agreement. float32 writes a greedy continuation of each chat prompt (tokenmill.bench's 16 chat
prompts, --tokens each); each quantization then predicts every one of those tokens from the
float32 prefix before it (max_tokens=1 on the prompt plus the prefix, prefix-cached), and
agreement is the share it predicts the same. Requests run one at a time, so every matmul has at
most a few rows and takes the quantized kernel, not the bfloat16 one a plan may keep for large
row counts (batched requests meet both).

    .venv/bin/python benchmarks/bench_accuracy.py [--tokens 64] [--modes int4,int8,bf16]
"""

from __future__ import annotations

import argparse

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.report import cpu_model
from tokenmill.bench.workload import CHAT_PROMPTS

GREEDY = dict(temperature=0.0)


def prompts_ids(llm: LLM) -> list[list[int]]:
    from tokenmill.prompts import render_chat

    return [render_chat(llm.chat_template, llm.tokenizer, [{"role": "user", "content": p}])
            for p in CHAT_PROMPTS]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default="int4,int8,bf16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    options = dict(kv_cache_gib=0.5, max_model_len=1024)
    reference = LLM(quantization="none", **options)
    prompts = prompts_ids(reference)
    outs = reference.generate(prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True,
                                                      **GREEDY))
    continuations = [o.completions[0].token_ids for o in outs]
    del reference
    print(f"CPU: {cpu_model()}; {len(prompts)} prompts x {args.tokens} greedy float32 tokens")
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
