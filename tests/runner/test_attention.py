"""The plain-PyTorch paged attention backend: exact index tensors, and output vs a naive loop."""

import math

import pytest
import torch

from tokenmill.runner.attention import TorchAttentionMetadata

CPU = torch.device("cpu")
BS = 4  # block size


def test_index_tensors_are_exact():
    # Row 0: decode at position 5 (context 6); row 1: decode at position 0 (context 1);
    # row 2: chunk of 3 new tokens at positions 4..6; row 3: fresh prompt of 2 tokens.
    meta = TorchAttentionMetadata.build([1, 1, 3, 2], [6, 1, 7, 2],
                                        [[7, 2], [5], [3, 9], [0]], BS, CPU)
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 5 * 4 + 0, 9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2,
                                          0, 1]
    assert meta.num_decodes == 2
    assert meta.decode_slots.tolist() == [[28, 29, 30, 31, 8, 9], [20, 0, 0, 0, 0, 0]]
    assert meta.decode_mask.shape == (2, 1, 1, 6)
    assert meta.decode_mask[:, 0, 0].tolist() == [[True] * 6, [True] + [False] * 5]
    chunk, fresh = meta.chunks
    assert (chunk.start, chunk.end, fresh.start, fresh.end) == (2, 5, 5, 7)
    assert chunk.slots.tolist() == [12, 13, 14, 15, 36, 37, 38]
    assert chunk.mask.int().tolist() == [[1, 1, 1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 1, 1, 1]]
    assert fresh.slots is None and fresh.mask is None


def test_decode_rows_must_come_first():
    with pytest.raises(AssertionError, match="first"):
        TorchAttentionMetadata.build([2, 1], [2, 3], [[0], [1]], BS, CPU)


def naive(q, k_ctx, v_ctx, first_pos):
    """q [n, Hq, D] at positions first_pos..; k_ctx/v_ctx [L, Hkv, D]: the request's whole
    context."""
    group = q.shape[1] // k_ctx.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            keys = k_ctx[: first_pos + i + 1, h // group]  # [<=L, D]
            weights = torch.softmax(keys @ q[i, h] / math.sqrt(q.shape[-1]), dim=0)
            out[i, h] = weights @ v_ctx[: first_pos + i + 1, h // group]
    return out


def test_forward_equals_naive_attention_and_writes_the_cache():
    torch.manual_seed(0)
    hq, hkv, d, num_blocks = 6, 2, 8, 16
    k_cache = torch.randn(num_blocks, BS, hkv, d)  # stale values everywhere
    v_cache = torch.randn(num_blocks, BS, hkv, d)
    # (new tokens, context after the step, block table)
    rows = [(1, 9, [4, 1, 12]), (1, 3, [6]), (4, 10, [2, 15, 0]), (5, 5, [8, 3])]
    meta = TorchAttentionMetadata.build([r[0] for r in rows], [r[1] for r in rows],
                                        [r[2] for r in rows], BS, CPU)
    t = sum(r[0] for r in rows)
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    out = meta.forward(q, k, v, k_cache, v_cache)

    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[meta.slot_mapping], k) and torch.equal(flat_v[meta.slot_mapping], v)
    start = 0
    for n, length, table in rows:
        slots = [table[p // BS] * BS + p % BS for p in range(length)]
        expected = naive(q[start:start + n], flat_k[slots], flat_v[slots], length - n)
        torch.testing.assert_close(out[start:start + n], expected, rtol=1e-5, atol=1e-5)
        start += n
