"""Qwen2: the Llama architecture with a bias on the query, key and value projections.

Stage: the model, one flat batch at a time (see llama.py). The Qwen2 report (2024, section 2.2)
builds on Llama's decoder: GQA, SwiGLU, RoPE, pre-norm RMSNorm, "QKV bias" for attention; the
output projection has none. The small models tie the LM head to the embeddings, which
`LlamaForCausalLM` already follows from `tie_word_embeddings`. Sliding-window attention
(`use_sliding_window`) is off in every released config; ModelConfig.from_hf maps it to no window.
"""

from __future__ import annotations

from tokenmill.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    qkv_bias = True


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    decoder_layer = Qwen2DecoderLayer
