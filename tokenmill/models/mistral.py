"""Mistral (Jiang et al., 2023, "Mistral 7B"): the Llama decoder with sliding-window attention.

Stage: the model. Every layer is Llama's (grouped-query attention, RoPE, RMSNorm, SwiGLU; Hugging
Face parameter names), so a Mistral checkpoint loads into these classes as is. What the paper
adds is where each query looks, and with it how much of the cache a sequence needs:

- Sliding window attention (section 2): the hidden state at position i of layer k attends to the
  positions (i - W, i] of layer k - 1, itself included, W = `config.sliding_window`; this is
  transformers' mask `kv_idx > q_idx - sliding_window`. Stacked layers still carry information
  up to k * W tokens back. The window is one property of a step's attention, shared by every
  layer, so the runner builds it into the step's `AttentionMetadata` once (runner/attention.py):
  a decode gathers at most W cached positions, a prefill chunk attends under a banded causal mask.
- Rolling buffer cache: the paper keeps W positions per sequence, position i in slot i mod W.
  Over the paged cache the same bound comes from freeing: before each step the block manager
  releases the blocks wholly before the window of the step's first query (engine/block_manager.py),
  so a sequence holds its window's blocks, not its history, and a released block serves other
  requests or stays in the prefix cache.
- Pre-fill and chunking: a long prompt is computed in chunks under the scheduler's token budget,
  each chunk attending to the cached window and to itself.

The window applies when it is shorter than the context served: `EngineConfig.resolve` puts it in
`CacheConfig.sliding_window`, which the scheduler and the runner read. Checkpoints without a window
(Mistral v0.2 and later) run as plain Llama.
"""

from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's weights and forward; the window lives in the step's attention (module docstring)."""
