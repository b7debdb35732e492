"""Decode attention alone: the native paged kernel against gathering each row's context for SDPA
(a measurement, not a test).

    .venv/bin/python benchmarks/bench_attention.py

The default model's heads (9 query heads over 3 KV heads of 64), a bfloat16 cache in blocks of
16 placed at random, and one cache per layer for 30 layers, so that like a served model's the
working set outgrows the CPU's caches (one cache reused every call stays in L2/L3 and flatters
whichever path reads more). ms per step of 30 layers, each path measured twice, alternating.
"""

import time

import torch
import torch.nn.functional as F

from tokenmill.runner.native import paged_decode_attention

HQ, HKV, D, BS, LAYERS = 9, 3, 64, 16, 30


def main() -> None:
    torch.set_num_threads(2)
    kernel = paged_decode_attention()
    assert kernel is not None, "the native kernel could not be built here"
    for batch, ctx in ((1, 200), (8, 200), (32, 200), (8, 1000)):
        blocks = -(-ctx // BS)
        n = batch * blocks + 1
        caches = [(torch.randn(n, BS, HKV, D).bfloat16(), torch.randn(n, BS, HKV, D).bfloat16())
                  for _ in range(LAYERS)]
        tables = (torch.randperm(n - 1)[:batch * blocks].view(batch, blocks) + 1).int()
        q = torch.randn(batch, HQ, D).bfloat16()
        out = torch.empty_like(q)
        starts = torch.zeros(batch, dtype=torch.int32)
        lens = torch.full((batch,), ctx, dtype=torch.int32)
        pos = torch.arange(ctx)
        slots = (tables.long()[:, pos // BS] * BS + pos % BS).reshape(-1)  # [batch * ctx]
        mask = torch.ones(batch, 1, 1, ctx, dtype=torch.bool)

        def gathered():
            for k_cache, v_cache in caches:
                k = k_cache.view(-1, HKV, D).index_select(0, slots).view(batch, ctx, HKV, D)
                v = v_cache.view(-1, HKV, D).index_select(0, slots).view(batch, ctx, HKV, D)
                F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2),
                                               v.transpose(1, 2), attn_mask=mask,
                                               enable_gqa=True)

        def paged():
            for k_cache, v_cache in caches:
                kernel(q, k_cache, v_cache, tables, starts, lens, D ** -0.5, out)

        times = {"gather + SDPA": [], "paged kernel": []}
        for _ in range(2):
            for name, step in (("gather + SDPA", gathered), ("paged kernel", paged)):
                step()
                start = time.perf_counter()
                for _ in range(10):
                    step()
                times[name].append((time.perf_counter() - start) / 10 * 1e3)
        print(f"batch {batch}, {ctx} keys: " + ", ".join(
            f"{name} {' / '.join(f'{t:.2f}' for t in ts)} ms" for name, ts in times.items()))


if __name__ == "__main__":
    main()
