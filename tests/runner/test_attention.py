"""The paged attention backends: exact index tensors, and output vs a naive loop. Both the
plain-PyTorch backend and the native paged decode kernel (`BACKENDS`) are held to the same naive
reference; the kernel is built once per machine (runner/native.py)."""

import math

import pytest
import torch

from tokenmill.engine.block_manager import NULL_BLOCK
from tokenmill.runner.attention import (PAD_SLACK_KEYS, CpuPagedAttentionMetadata,
                                        TorchAttentionMetadata, _decode_groups)
from tokenmill.runner.native import paged_decode_attention

CPU = torch.device("cpu")
BS = 4  # block size
NATIVE = pytest.mark.skipif(paged_decode_attention() is None,
                            reason="the native paged kernel could not be built here (no compiler?)")
BACKENDS = [TorchAttentionMetadata,
            pytest.param(CpuPagedAttentionMetadata, marks=NATIVE, id="native-paged")]


def test_index_tensors_are_exact():
    # Row 0: decode at position 5 (context 6); row 1: decode at position 0 (context 1);
    # row 2: chunk of 3 new tokens at positions 4..6; row 3: fresh prompt of 2 tokens.
    meta = TorchAttentionMetadata.build([1, 1, 3, 2], [6, 1, 7, 2],
                                        [[7, 2], [5], [3, 9], [0]], BS, CPU)
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 5 * 4 + 0, 9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2,
                                          0, 1]
    assert meta.num_decodes == 2
    [group] = meta.decodes.groups  # lengths this close: one padded batch, in batch order
    assert group.rows == slice(0, 2)
    assert group.slots.tolist() == [[28, 29, 30, 31, 8, 9], [20, 0, 0, 0, 0, 0]]
    assert group.mask.shape == (2, 1, 1, 6)
    assert group.mask[:, 0, 0].tolist() == [[True] * 6, [True] + [False] * 5]
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


def naive(q, k_ctx, v_ctx, first_pos, window=None):
    """q [n, Hq, D] at positions first_pos..; k_ctx/v_ctx [L, Hkv, D]: the request's whole
    context. The query at position p attends to positions max(0, p - window + 1)..p."""
    group = q.shape[1] // k_ctx.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        p = first_pos + i
        lo = 0 if window is None else max(0, p - window + 1)
        for h in range(q.shape[1]):
            keys = k_ctx[lo:p + 1, h // group]  # [<=L, D]
            weights = torch.softmax(keys @ q[i, h] / math.sqrt(q.shape[-1]), dim=0)
            out[i, h] = weights @ v_ctx[lo:p + 1, h // group]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_forward_equals_naive_attention_and_writes_the_cache(cache_dtype, tol, backend):
    """A cache narrower than the model (the engine's bfloat16 cache under int/bf16 linears)
    stores K/V rounded to its dtype and attends in it, returning the model's float32: naive
    float32 attention over the rounded q, k and v, to that dtype's precision."""
    torch.manual_seed(0)
    hq, hkv, d, num_blocks = 6, 2, 8, 16
    k_cache = torch.randn(num_blocks, BS, hkv, d).to(cache_dtype)  # stale values everywhere
    v_cache = torch.randn(num_blocks, BS, hkv, d).to(cache_dtype)
    # (new tokens, context after the step, block table)
    rows = [(1, 9, [4, 1, 12]), (1, 3, [6]), (4, 10, [2, 15, 0]), (5, 5, [8, 3])]
    meta = backend.build([r[0] for r in rows], [r[1] for r in rows],
                                        [r[2] for r in rows], BS, CPU)
    t = sum(r[0] for r in rows)
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    out = meta.forward(q, k, v, k_cache, v_cache)
    assert out.dtype == torch.float32

    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[meta.slot_mapping], k.to(cache_dtype))
    assert torch.equal(flat_v[meta.slot_mapping], v.to(cache_dtype))
    start = 0
    for n, length, table in rows:
        slots = [table[p // BS] * BS + p % BS for p in range(length)]
        expected = naive(q[start:start + n].to(cache_dtype).float(), flat_k[slots].float(),
                         flat_v[slots].float(), length - n)
        torch.testing.assert_close(out[start:start + n], expected, rtol=tol, atol=tol)
        start += n


def test_decode_rows_group_by_length_so_a_long_context_pads_no_short_row():
    assert _decode_groups([300, 280, 310]) == [[0, 1, 2]]  # padding within the slack
    assert _decode_groups([100, 5000, 90, 4800, 120]) == [[1, 3], [0, 2, 4]]
    long = PAD_SLACK_KEYS * 4
    assert _decode_groups([long, 10, long // 2]) == [[0, 2], [1]]  # waste within half
    assert _decode_groups([long, 10, long // 4]) == [[0], [1, 2]]
    assert _decode_groups([]) == []


def test_grouped_decode_rows_equal_naive_attention():
    """A long context among short ones: its own group, the short rows another, out of batch
    order; every row's output lands in its own row."""
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 8
    lengths = [9, PAD_SLACK_KEYS + 700, 5, 12]
    tables, first = [], 0
    for length in lengths:  # distinct blocks for each row
        n = -(-length // BS)
        tables.append(list(range(first, first + n)))
        first += n
    k_cache, v_cache = torch.randn(first, BS, hkv, d), torch.randn(first, BS, hkv, d)
    meta = TorchAttentionMetadata.build([1] * 4, lengths, tables, BS, CPU)
    assert [g.rows.tolist() for g in meta.decodes.groups] == [[1], [0, 2, 3]]
    q, k, v = torch.randn(4, hq, d), torch.randn(4, hkv, d), torch.randn(4, hkv, d)
    out = meta.forward(q, k, v, k_cache, v_cache)
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    for i, (length, table) in enumerate(zip(lengths, tables)):
        slots = [table[p // BS] * BS + p % BS for p in range(length)]
        expected = naive(q[i:i + 1], flat_k[slots], flat_v[slots], length - 1)
        torch.testing.assert_close(out[i:i + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_kind_takes_the_cpu_flash_kernel_never_the_math_path(dtype):
    """Decode rows, a fresh prompt and a chunk over earlier context: the math path materializes
    every score (a 512-token chunk over 4,096 keys was 4 to 13 times slower there)."""
    hq, hkv, d = 6, 2, 8
    k_cache, v_cache = (torch.randn(16, BS, hkv, d, dtype=dtype) for _ in range(2))
    meta = TorchAttentionMetadata.build([1, 3, 2], [6, 7, 2], [[7, 2], [3, 9], [0]], BS, CPU)
    q, k, v = torch.randn(6, hq, d), torch.randn(6, hkv, d), torch.randn(6, hkv, d)
    with torch.profiler.profile() as prof:
        meta.forward(q, k, v, k_cache, v_cache)
    ops = [e.key for e in prof.key_averages()]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


@NATIVE
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_native_paged_decodes_equal_gathered_sdpa_at_model_shapes(cache_dtype):
    """The default model's heads (9 query heads over 3 KV heads of 64) in blocks of 16: rows of
    one token, of a block and one, of many blocks, in shuffled blocks; in float32 the two paths
    agree to rounding."""
    torch.manual_seed(0)
    hq, hkv, d, bs = 9, 3, 64, 16
    lengths = [1, 16, 17, 200, 1000, 33]
    sizes = [-(-n // bs) for n in lengths]
    blocks = torch.randperm(sum(sizes) + 5).tolist()
    tables = [blocks[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    k_cache = torch.randn(sum(sizes) + 5, bs, hkv, d).to(cache_dtype)
    v_cache = torch.randn(sum(sizes) + 5, bs, hkv, d).to(cache_dtype)
    q, k, v = (torch.randn(len(lengths), h, d) for h in (hq, hkv, hkv))
    outs = []
    for backend in (TorchAttentionMetadata, CpuPagedAttentionMetadata):
        meta = backend.build([1] * len(lengths), lengths, tables, bs, CPU)
        outs.append(meta.forward(q, k, v, k_cache.clone(), v_cache.clone()))
    tol = 1e-5 if cache_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)


@NATIVE
def test_native_decodes_read_the_cache_in_place():
    """No gather (index_select) and no SDPA for decode rows: the one kernel call a layer."""
    hq, hkv, d = 6, 2, 8
    k_cache, v_cache = (torch.randn(16, BS, hkv, d) for _ in range(2))
    meta = CpuPagedAttentionMetadata.build([1, 1], [6, 9], [[7, 2], [3, 9, 4]], BS, CPU)
    q, k, v = torch.randn(2, hq, d), torch.randn(2, hkv, d), torch.randn(2, hkv, d)
    with torch.profiler.profile() as prof:
        meta.forward(q, k, v, k_cache, v_cache)
    ops = [e.key for e in prof.key_averages()]
    assert "tokenmill::paged_decode_attention" in ops
    assert not any("index_select" in op or "scaled_dot_product" in op for op in ops)


N = NULL_BLOCK


def test_window_index_tensors_are_exact():
    # Window 6 over blocks of 4. Row 0: decode at position 9 (block 0 out of the window);
    # row 1: decode at position 2; row 2: chunk at positions 8..10 (first key 3: block 0 still
    # needed); row 3: chunk at 13..14 (first key 8: blocks 0 and 1 released); row 4: fresh
    # prompt of 9 tokens, longer than the window; row 5: fresh prompt of 5 tokens.
    meta = TorchAttentionMetadata.build(
        [1, 1, 3, 2, 9, 5], [10, 3, 11, 15, 9, 5],
        [[N, 7, 2], [5], [1, 3, 9], [N, N, 4, 6], [10, 11, 12], [13, 14]], BS, CPU,
        sliding_window=6)
    assert meta.slot_mapping.tolist() == ([9, 22, 36, 37, 38, 25, 26]
                                          + [40, 41, 42, 43, 44, 45, 46, 47, 48]
                                          + [52, 53, 54, 55, 56])
    [group] = meta.decodes.groups
    assert group.slots.tolist() == [[28, 29, 30, 31, 8, 9], [20, 21, 22, 0, 0, 0]]
    assert group.mask[:, 0, 0].tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    chunk, late, long, short = meta.chunks
    assert chunk.slots.tolist() == [7, 12, 13, 14, 15, 36, 37, 38]  # positions 3..10
    assert chunk.mask.int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0],
                                         [0, 1, 1, 1, 1, 1, 1, 0],
                                         [0, 0, 1, 1, 1, 1, 1, 1]]
    assert late.slots.tolist() == [16, 17, 18, 19, 24, 25, 26]  # positions 8..14
    assert late.mask.int().tolist() == [[1, 1, 1, 1, 1, 1, 0],
                                        [0, 1, 1, 1, 1, 1, 1]]
    assert long.slots is None  # its keys are its own new tokens, under a banded mask
    assert long.mask.int().tolist() == [[1 if 0 <= q - k < 6 else 0 for k in range(9)]
                                        for q in range(9)]
    assert (short.slots, short.mask) == (None, None)  # within the window: plain causal


def test_a_window_no_shorter_than_the_context_changes_nothing():
    args = ([1, 1, 3, 2], [6, 1, 7, 2], [[7, 2], [5], [3, 9], [0]], BS, CPU)
    full, wide = TorchAttentionMetadata.build(*args), TorchAttentionMetadata.build(*args, 7)
    [a], [b] = full.decodes.groups, wide.decodes.groups
    assert torch.equal(a.slots, b.slots) and torch.equal(a.mask, b.mask)
    for a, b in zip(full.chunks, wide.chunks, strict=True):
        assert (a.slots is None) == (b.slots is None) and (a.mask is None) == (b.mask is None)
        if a.slots is not None:
            assert torch.equal(a.slots, b.slots) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [6, 8])  # not a multiple of the block size, and one
def test_window_forward_equals_naive_windowed_attention(window, backend):
    torch.manual_seed(0)
    hq, hkv, d, num_blocks = 6, 2, 8, 24
    k_cache = torch.randn(num_blocks, BS, hkv, d)  # stale values everywhere
    v_cache = torch.randn(num_blocks, BS, hkv, d)
    # (new tokens, context after the step, block table before NULLing what the window left)
    rows = [(1, 23, [4, 1, 12, 5, 16, 17]), (1, 3, [6]), (1, 8, [18, 19]),
            (4, 14, [2, 15, 0, 20]), (11, 11, [8, 3, 21]), (6, 19, [9, 10, 11, 13, 14])]
    tables = []
    for n, length, table in rows:  # what the block manager hands the runner: no block is
        skipped = max(0, length - n - window + 1) // BS  # wholly before the first query's window
        tables.append([N] * skipped + table[skipped:])
    meta = backend.build([r[0] for r in rows], [r[1] for r in rows], tables, BS, CPU,
                         sliding_window=window)
    if backend is TorchAttentionMetadata:  # at most the window, however long the context
        assert [g.slots.shape for g in meta.decodes.groups] == [(3, window)]
    else:  # the kernel starts each row at its window
        assert meta.decodes.starts.tolist() == [23 - window, 0, 8 - window]
    t = sum(r[0] for r in rows)
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    out = meta.forward(q, k, v, k_cache, v_cache)  # a NULL_BLOCK slot read would be out of range

    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[meta.slot_mapping], k) and torch.equal(flat_v[meta.slot_mapping], v)
    start = 0
    for n, length, table in rows:
        slots = [table[p // BS] * BS + p % BS for p in range(length)]
        expected = naive(q[start:start + n], flat_k[slots], flat_v[slots], length - n, window)
        torch.testing.assert_close(out[start:start + n], expected, rtol=1e-5, atol=1e-5)
        start += n
