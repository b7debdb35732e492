"""Rotary position embeddings: the cos/sin of every served position, and their application.

Stage: model construction. The model precomputes one [P, 2, D] table at build time and indexes it
by position each step, so every RoPE variant must be expressible as fixed inverse frequencies:

- default: theta ** (-2i / D).
- linear: the default frequencies divided by `factor`
  (HF's `_compute_linear_scaling_rope_parameters`).
- llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp in between
  (HF's `_compute_llama3_parameters`).
- dynamic (NTK): HF recomputes the base every forward from the current sequence length, and only
  once it exceeds the original context; a position-indexed table cannot follow a per-sequence
  base, so, as vLLM's DynamicNTKScalingRotaryEmbedding, we use the base HF uses at the longest
  served length (original context x factor) for every position. It equals HF's exactly for a
  sequence of that length and differs from HF's for shorter ones.
- freq_factors: llama.cpp's `rope_freqs` tensor, per-frequency divisors; how GGUF files carry
  llama3 scaling (its converter writes the factors instead of the parameters).

None of these scales the attention (HF's `attention_factor` is 1.0 for all of them); YaRN and
LongRoPE, which do, are refused by the registry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "freq_factors")


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> Tensor:
    """The D/2 inverse frequencies, float32, for `scaling` (None: default RoPE)."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "dynamic":  # the base HF computes (in float32) at seq_len = original x factor
        factor = scaling["factor"]
        growth = torch.tensor(factor * factor - (factor - 1), dtype=torch.float32)
        theta = theta * growth ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":
        return inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float32)
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    raise NotImplementedError(f"rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama 3.1: wavelengths beyond original/low_freq_factor are stretched by `factor`, those
    below original/high_freq_factor kept, the ones between interpolated."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(head_dim: int, max_positions: int, theta: float,
               scaling: dict | None = None) -> Tensor:
    """cos and sin of every position, [P, 2, D] float32, frequencies repeated (rotate-half)."""
    inv_freq = inv_frequencies(head_dim, theta, scaling)  # [D/2]
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
    return torch.stack([emb.cos(), emb.sin()], dim=1)  # [P, 2, D]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, D]; cos/sin [T, 1, D]. Rotates pairs (i, i + D/2), as HF's rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, D/2] each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
