"""Weight-only quantized and bfloat16 linears for the CPU, through PyTorch's own kernels, and the
row-count dispatch between two of them.

A decode step multiplies a few rows (M = the running requests) by every weight: it is bound by
reading the weights, so fewer bytes per weight win (int4: 0.5 B plus a scale and zero per 32,
int8: 1 B plus a scale per output channel, against float32's 4 B). A prefill chunk multiplies
hundreds of rows: it is bound by arithmetic, where bfloat16 matmuls on AMX or AVX-512 BF16 win
and the weight-only kernels, which unpack weights for every row block, lose. `RowDispatch` holds
one kernel for each and picks by M (runner/linear_plan.py chooses them by measurement).

The kernels take bfloat16 activations (with float32 ones PyTorch falls back to a path 10 to 100
times slower): x is rounded to bfloat16 on the way in and y returned as float32, so a quantized
linear differs from float32 by the weights' quantization and the activations' bfloat16 rounding
(tests/runner/test_quant_linear.py bounds both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_GROUP = 32  # weights per int4 scale and zero: llama.cpp's Q4 block size


class Int8Linear(nn.Module):
    """y = x (s * Q)^T (+ b): Q int8 [N, K], s float32 per output channel (symmetric)."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # [N, K] int8
        self.register_buffer("scales", scales.to(torch.bfloat16))  # [N]
        self.bias = bias

    @staticmethod
    def supports(out_features: int, in_features: int) -> bool:
        """The CPU kernel reads K in blocks of 16: other K give wrong sums or crash (torch
        2.13, measured)."""
        return in_features % 16 == 0

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        w = weight.detach().float()
        # The kernel's scales are bfloat16: round them first and quantize against them.
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).bfloat16().float()  # [N]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales, bias)

    def dequantized(self) -> Tensor:  # [N, K] float32
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scales).float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W = (Q - 8) * s + z per group of INT4_GROUP weights along K: Q in
    0..15 packed two per byte in the CPU kernel's layout, s and z bfloat16 [K / G, N]. A GGUF
    Q4_1 block (w = d * q + m) is this with s = d, z = m + 8d: the same 4 bits, requantized."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, in_features: int,
                 bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], in_features
        self.register_buffer("packed", packed)  # [N, K / 2] uint8, the kernel's layout
        self.register_buffer("scales_and_zeros",
                             scales_and_zeros.to(torch.bfloat16))  # [K / G, N, 2]
        self.bias = bias

    @staticmethod
    def supports(out_features: int, in_features: int) -> bool:
        """The CPU kernel's layout needs N in 16s and K in whole groups."""
        return out_features % 16 == 0 and in_features % INT4_GROUP == 0

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None) -> Int4Linear:
        """Asymmetric min-max quantization of each group (K must be a multiple of G)."""
        w = weight.detach().float()
        n, k = w.shape
        if k % INT4_GROUP:
            raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, not {k}")
        groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K / G]
        # The kernel's scales and zeros are bfloat16: round them first, quantize against them.
        scales = ((high - low) / 15).clamp(min=1e-12).bfloat16().float()
        zeros = (low + 8 * scales).bfloat16().float()
        q = torch.round((groups - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
        q = q.to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scales_and_zeros, k, bias)

    def dequantized(self) -> Tensor:  # [N, K] float32
        k, groups = self.in_features, self.in_features // INT4_GROUP
        eye = torch.eye(k, dtype=torch.bfloat16)  # exact in bfloat16: y = W^T, column by column
        w = torch._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP,
                                              self.scales_and_zeros).float().T
        return w.contiguous().view(self.out_features, groups, INT4_GROUP).flatten(1)

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP,
                                              self.scales_and_zeros).float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Bf16Linear(nn.Module):
    """y = x W^T (+ b) in bfloat16 (oneDNN: AMX or AVX-512 BF16 where the CPU has them), float32
    in and out."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))  # [N, K]
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


class RowDispatch(nn.Module):
    """`small` for inputs of at most `threshold` rows (decode-sized), `large` above."""

    def __init__(self, small: nn.Module, large: nn.Module, threshold: int):
        super().__init__()
        self.small, self.large, self.threshold = small, large, threshold
        self.out_features, self.in_features = small.out_features, small.in_features

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        return (self.small if rows <= self.threshold else self.large)(x)
