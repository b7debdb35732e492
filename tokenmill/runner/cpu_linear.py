"""Linear layers with oneDNN-prepacked weights: the runner's CPU float32 fast path.

A decode step multiplies a few rows (M = 1..64) by every weight matrix. MKL's GEMM re-blocks the
plain [N, K] weight on every call; oneDNN reorders it once into its blocked layout. Measured on
2 AVX2 cores over all linears of SmolLM2-135M: M=1 46 -> 32 ms, M=16 55 -> 40 ms,
M=64 131 -> 81 ms; the tied 49152x576 LM head at M=16 17 -> 9 ms. Results differ from MKL's only
by float32 summation order.

oneDNN keeps what it builds for each GEMM shape (a primitive, in a cache of 1024, and buffers
beside it) for the life of the process, so every new row count M costs memory for good: served
traffic, whose M is whatever the step's token count happens to be, grew a server's RSS by ~200
MiB over 30 minutes as rare counts kept turning up. `padded_rows` rounds M up to one of 56 sizes
up to 512 (exact below 16, then 8 steps per power of two: at most 1/8 more rows), so that memory
is spent once, in the first minutes. Measured on the four SmolLM2 shapes, M = 1..512 twice: 431
MiB in use, still growing until every M had been seen, against 136 MiB, reached in the first pass.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held as a oneDNN tensor; a drop-in for an inference nn.Linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = weight.detach().to_mkldnn()  # [N, K], oneDNN blocked layout
        self.packed_bias = None if bias is None else bias.detach().to_mkldnn()  # [N]

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        rows = x.reshape(-1, self.in_features)  # [M, K]
        m = rows.shape[0]
        padding = padded_rows(m) - m
        rows = F.pad(rows, (0, 0, 0, padding)) if padding else rows.contiguous()  # [P, K]
        y = torch._C._nn.mkldnn_linear(rows.to_mkldnn(), self.packed_weight, self.packed_bias)
        return y.to_dense()[:m].view(*x.shape[:-1], self.out_features)  # rows are independent


def padded_rows(m: int) -> int:
    """The row count a GEMM of m rows runs with: m below 16, else m rounded up to a multiple of
    2^(bits(m) - 4), i.e. 8 sizes per power of two."""
    if m < 16:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


def model_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree sharing every tensor (deepcopy's memo maps each to
    itself): its linears can be replaced (packed, quantized) in the copy alone, so a LoadedModel
    stays what it was loaded as, whoever runs it; its plain weights are freed once the caller
    drops the original, and until then both are held."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)
