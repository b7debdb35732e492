"""Attention over the paged KV cache: the backend seam of the runner stage.

A backend is an `AttentionMetadata` subclass: `build()` turns one step's rows (query length,
context length, block table) into index tensors ONCE per step, and `forward()` is called by every
layer to write the step's new K/V into that layer's cache and attend. The plain-PyTorch backend
here runs everywhere: decode rows gathered into padded batches for SDPA, prefill chunks through
SDPA (PyTorch's CPU flash kernel). `CpuPagedAttentionMetadata` differs in decode rows only: a
native kernel (runner/csrc/paged_attention.cpp) reads their keys and values in place from the
cache blocks, gathering nothing.

Cache layout, per layer: K and V are each [num_blocks, block_size, num_kv_heads, head_dim]; token
`p` of a request lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Sliding window W: the query at position p attends to positions (p - W, p] only (transformers'
`kv_idx > q_idx - sliding_window`). Only those positions are gathered, so a decode reads at most
W slots however long its context, and the table entries of blocks wholly before a row's first
query's window may be anything (the block manager's NULL_BLOCK): they are never read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.runner.native import paged_decode_attention


class AttentionMetadata(ABC):
    """One step's attention inputs, shared by all layers."""

    @classmethod
    @abstractmethod
    def build(cls, query_lens: list[int], context_lens: list[int],
              block_tables: list[list[int]], block_size: int, device: torch.device,
              sliding_window: int | None = None) -> AttentionMetadata:
        """Rows in batch order; `context_lens[i]` counts row i's tokens in the cache after this
        step (computed + new). Rows with query length 1 must come first. `sliding_window`: W
        as in the module docstring; None: each query attends to its whole context."""

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's new tokens -> attention output
        [T, Hq, D]."""


# Decode rows are padded to the longest context of their group; a row joins a group while the
# padding stays within half the group's real keys or this many keys, whichever is more. One
# group for rows of similar length (one SDPA call a layer); a long context among short ones gets
# its own, so it does not make every row read as many keys (measured: 8 streams beside one
# 4,096-token context, docs/BENCHMARKS.md).
PAD_SLACK_KEYS = 2048


class _Decodes(ABC):
    """How one step's B decode rows (query length 1, first in the batch) are attended."""

    @classmethod
    @abstractmethod
    def build(cls, lens: Tensor, spans: Tensor, tables: Tensor, block_size: int,
              device: torch.device) -> _Decodes:
        """lens [B]: each row's context after this step; spans [B]: how many of its last
        positions it attends (min(W, context)); tables [B, W] int64 block tables."""

    @abstractmethod
    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor) -> None:
        """q [B, Hq, D] in the cache's dtype -> out [B, Hq, D] (the model's dtype), in place."""


@dataclass
class _DecodeGroup:
    """Decode rows attended as one padded batch."""

    rows: slice | Tensor  # their rows of the flat batch: a slice, or [b] int64 indices
    slots: Tensor  # [b, Lmax] int64: slots of each row's keys (padding -> 0)
    mask: Tensor  # [b, 1, 1, Lmax] bool: True on a row's real keys


@dataclass
class GatheredDecodes(_Decodes):
    """Plain PyTorch: per group of rows of similar length, each row's keys and values gathered
    into a padded [b, Hkv, Lmax, D] batch, then one masked SDPA call."""

    groups: list[_DecodeGroup]  # every decode row in exactly one group

    @classmethod
    def build(cls, lens, spans, tables, block_size, device):
        groups = []
        for members in _decode_groups(spans.tolist()):
            rows = (slice(0, len(lens)) if len(members) == len(lens) else
                    torch.tensor(members, dtype=torch.long))
            g_lens, g_spans = lens[rows], spans[rows]  # [b]
            lmax = int(g_spans.max())
            ctx = torch.arange(lmax)  # [Lmax]
            valid = ctx[None, :] < g_spans[:, None]  # [b, Lmax]
            # Padding looks up the row's last position (its table may end there); slot 0, masked.
            key_pos = torch.minimum((g_lens - g_spans)[:, None] + ctx, g_lens[:, None] - 1)
            slots = _slots(tables[rows][:, None, :].expand(-1, lmax, -1), key_pos,
                           block_size) * valid  # [b, Lmax]
            groups.append(_DecodeGroup(rows if isinstance(rows, slice) else rows.to(device),
                                       slots.to(device), valid[:, None, None, :].to(device)))
        return cls(groups)

    def attend(self, q, k_cache, v_cache, out):
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [S, Hkv, D]
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)  # [S, Hkv, D]
        for g in self.groups:
            qd = q[g.rows].unsqueeze(2)  # [b, Hq, 1, D]
            kd = _gather(k_flat, g.slots).transpose(1, 2)  # [b, Hkv, Lmax, D]
            vd = _gather(v_flat, g.slots).transpose(1, 2)  # [b, Hkv, Lmax, D]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.mask,
                                                enable_gqa=True)  # [b, Hq, 1, D]
            out[g.rows] = od.squeeze(2).to(out.dtype)  # an index put needs the same dtype


@dataclass
class PagedDecodes(_Decodes):
    """The native kernel: each row's keys [starts, lens) read in place through its block table,
    whatever their lengths (no padding, no groups)."""

    tables: Tensor  # [B, W] int32
    starts: Tensor  # [B] int32: first position attended
    lens: Tensor  # [B] int32: one past the last

    @classmethod
    def build(cls, lens, spans, tables, block_size, device):
        return cls(tables.to(device=device, dtype=torch.int32).contiguous(),
                   (lens - spans).to(device=device, dtype=torch.int32),
                   lens.to(device=device, dtype=torch.int32))

    def attend(self, q, k_cache, v_cache, out):
        kernel = paged_decode_attention()
        assert kernel is not None, "CpuPagedAttentionMetadata needs the native kernel"
        q = q.contiguous()
        result = out if out.dtype == q.dtype and out.is_contiguous() else torch.empty_like(q)
        kernel(q, k_cache, v_cache, self.tables, self.starts, self.lens, q.shape[-1] ** -0.5,
               result)
        if result is not out:
            out.copy_(result)


@dataclass
class _Chunk:
    """A prefill chunk: rows [start, end) of the flat batch, one request."""

    start: int
    end: int
    slots: Tensor | None  # [L] int64 cache slots of the keys; None: the keys are the chunk's own
    mask: Tensor | None  # [n, L] bool, True = attend; None: plain causal over the chunk itself


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """Plain-PyTorch backend: decode rows gathered into padded batches, prefill chunks one at a
    time."""

    slot_mapping: Tensor  # [T] int64: cache slot of each new token
    num_decodes: int  # B: the first B rows have query length 1
    decodes: _Decodes  # how the B decode rows are attended
    chunks: list[_Chunk]  # prefill chunks after the decode rows, in batch order

    decodes_class: ClassVar[type[_Decodes]] = GatheredDecodes

    @classmethod
    def build(cls, query_lens, context_lens, block_tables, block_size, device,
              sliding_window=None):
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        assert all(n > 1 for n in query_lens[num_decodes:]), "rows of query length 1 come first"
        width = max(len(bt) for bt in block_tables)
        tables = torch.tensor([bt + [0] * (width - len(bt)) for bt in block_tables],
                              dtype=torch.long)  # [R, W]
        qlens = torch.tensor(query_lens, dtype=torch.long)  # [R]
        clens = torch.tensor(context_lens, dtype=torch.long)  # [R]

        # New tokens: row of each token and its position in its request.
        row = torch.repeat_interleave(torch.arange(len(query_lens)), qlens)  # [T]
        starts = torch.cumsum(qlens, 0) - qlens  # [R] first flat index of each row
        pos = clens[row] - qlens[row] + torch.arange(len(row)) - starts[row]  # [T]
        slot_mapping = _slots(tables[row], pos, block_size)  # [T]

        dlens = clens[:num_decodes]  # [B]
        spans = dlens if sliding_window is None else dlens.clamp(max=sliding_window)  # [B]
        decodes = cls.decodes_class.build(dlens, spans, tables[:num_decodes], block_size,
                                          device)

        chunks = []
        for i in range(num_decodes, len(query_lens)):
            start, n, length = int(starts[i]), query_lens[i], context_lens[i]
            first_query = length - n  # position of the chunk's first token
            if first_query == 0 and (sliding_window is None or n <= sliding_window):
                chunks.append(_Chunk(start, start + n, None, None))  # causal within the chunk
                continue
            first_key = (0 if sliding_window is None else
                         max(0, first_query - sliding_window + 1))  # the first query's window
            q_pos = torch.arange(first_query, length)  # [n]
            k_pos = torch.arange(first_key, length)  # [L]
            mask = k_pos[None, :] <= q_pos[:, None]  # [n, L] causal
            if sliding_window is not None:
                mask &= k_pos[None, :] > q_pos[:, None] - sliding_window  # [n, L] banded
            slots = (None if first_query == 0 else  # no earlier context: the chunk's own keys
                     _slots(tables[i].expand(len(k_pos), -1), k_pos, block_size).to(device))
            chunks.append(_Chunk(start, start + n, slots, mask.to(device)))
        return cls(slot_mapping.to(device), num_decodes, decodes, chunks)

    def forward(self, q, k, v, k_cache, v_cache):
        num_kv_heads, head_dim = k_cache.shape[-2:]
        out = torch.empty_like(q)  # [T, Hq, D], in the model's dtype
        # A cache narrower than the model (bfloat16 under float32) is attended in its own dtype.
        q, k, v = (t.to(k_cache.dtype) for t in (q, k, v))
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [S, Hkv, D], S = blocks * block_size
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)  # [S, Hkv, D]
        k_flat.index_copy_(0, self.slot_mapping, k)
        v_flat.index_copy_(0, self.slot_mapping, v)
        if self.num_decodes:
            b = self.num_decodes
            self.decodes.attend(q[:b], k_cache, v_cache, out[:b])
        # Chunks get a batch dimension of 1: PyTorch's CPU flash kernel takes only 4-D inputs,
        # and 3-D ones fall back to the math path (a 512-token chunk over 4,096 keys: 120 ms a
        # layer against 29 in float32, 10 in bfloat16).
        for c in self.chunks:
            qc = q[c.start:c.end].transpose(0, 1)[None]  # [1, Hq, n, D]
            if c.slots is None:
                kc = k[c.start:c.end].transpose(0, 1)[None]  # [1, Hkv, n, D]
                vc = v[c.start:c.end].transpose(0, 1)[None]  # [1, Hkv, n, D]
            else:
                kc = _gather(k_flat, c.slots).transpose(0, 1)[None]  # [1, Hkv, L, D]
                vc = _gather(v_flat, c.slots).transpose(0, 1)[None]  # [1, Hkv, L, D]
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask,
                                                is_causal=c.mask is None,
                                                enable_gqa=True)  # [1, Hq, n, D]
            out[c.start:c.end] = oc[0].transpose(0, 1)
        return out


class CpuPagedAttentionMetadata(TorchAttentionMetadata):
    """Decode rows through the native paged kernel (only where `paged_decode_attention()`
    loaded); prefill chunks as in the plain backend."""

    decodes_class = PagedDecodes


def _decode_groups(spans: list[int]) -> list[list[int]]:
    """Decode rows (by their key counts) -> groups of row indices, longest first: a row joins
    the current group while the group's padding stays within PAD_SLACK_KEYS or half its real
    keys. Rows of similar length: one group, in batch order."""
    order = sorted(range(len(spans)), key=lambda i: -spans[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * spans[group[0]]
            if padded - (real + spans[i]) <= max(PAD_SLACK_KEYS, (real + spans[i]) // 2):
                group.append(i)
                real += spans[i]
                continue
        groups.append([i])
        real = spans[i]
    return [sorted(group) for group in groups]


def _gather(flat: Tensor, slots: Tensor) -> Tensor:
    """flat [S, Hkv, D] rows at slots [...] -> [..., Hkv, D]. index_select on a flat index is
    several times faster on CPU than advanced indexing with a 2-D index."""
    return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat.shape[1:])


def _slots(tables: Tensor, pos: Tensor, block_size: int) -> Tensor:
    """Cache slot of position `pos` given the block table of its row: tables [..., W], pos [...]."""
    block = torch.gather(tables, -1, (pos // block_size).unsqueeze(-1)).squeeze(-1)  # [...]
    return block * block_size + pos % block_size
