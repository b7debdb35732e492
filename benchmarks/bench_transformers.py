"""The reference row of the serving table: transformers' own `generate` on the same weights, as
an offline batch (no server, no streaming), at the bench's batch sizes.

    .venv/bin/python benchmarks/bench_transformers.py CHECKPOINT_DIR [--batch 1,8,32]
        [--input-len 128] [--output-len 96] [--dtype float32|bfloat16]

Each batch size runs one batch of random prompts of exactly --input-len tokens (no padding, so
every row does the same work) through greedy `generate` with exactly
--output-len new tokens; output tokens/s is batch * output-len / wall time. A closed loop at
concurrency C in `tokenmill bench` keeps C requests in flight the same way, so the two compare
at equal C, but generate has no continuous batching: a batch ends when its longest row does.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.bench.report import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint,
                                                 dtype=getattr(torch, args.dtype)).eval()
    gen = torch.Generator().manual_seed(0)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.dtype}", flush=True)
    for batch in (int(b) for b in args.batch.split(",")):
        ids = torch.randint(100, model.config.vocab_size - 100, (batch, args.input_len),
                            generator=gen)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2,
                           do_sample=False)  # warm-up
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False)
            seconds = time.perf_counter() - start
        made = (out.shape[1] - args.input_len) * batch
        print(f"batch {batch}: {made} tokens in {seconds:.1f} s = {made / seconds:.1f} out tok/s",
              flush=True)


if __name__ == "__main__":
    main()
