"""Llama (and Mistral without sliding window): the model stage, one flat batch at a time.

Input is the step's tokens from many requests concatenated ([T]) with their positions; attention
over each request's own paged KV cache is delegated to the step's `AttentionMetadata`. Parameter
names are Hugging Face's, except that q/k/v and gate/up are each one `MergedLinear` (`qkv_proj`,
`gate_up_proj`) that the loader fills from the checkpoint's separate projections. The other
families reuse these blocks: Qwen2 sets `LlamaAttention.qkv_bias`, Mixtral swaps the decoder
layer (`decoder_layer`). Every size is read from the config, so a tensor-parallel rank builds
these classes from its shard of it (`distributed/parallel_linear.shard_config`: fewer heads and
hidden units) and runs this same forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.config import ModelConfig
from tokenmill.models.rope import apply_rope, rope_cache
from tokenmill.runner.attention import AttentionMetadata


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as in the reference implementation."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [T, H] -> [T, H]
        y = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
        return self.weight * y


class MergedLinear(nn.Linear):
    """Several of a checkpoint's projections of one input stacked as one linear (q, k and v;
    gate and up), so that one matmul computes them all: fewer, larger kernel calls per step.
    `shards` maps each checkpoint projection's name to its output rows, in output order; the
    loader copies each checkpoint weight into its rows (`rows`)."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards = shards

    def rows(self, shard: str) -> slice:
        start = 0
        for name, size in self.shards.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)


class LlamaAttention(nn.Module):
    qkv_bias = False  # q, k and v projections carry a bias (Qwen2); o_proj never does

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            c.hidden_size, {"q_proj": self.q_size, "k_proj": self.kv_size,
                            "v_proj": self.kv_size}, bias=self.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionMetadata,
                kv_cache: tuple[Tensor, Tensor]) -> Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D], a strided view
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attn.forward(q, k, v, *kv_cache)  # [T, Hq, D]
        return self.o_proj(o.view(t, -1))  # [T, H]


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(
            c.hidden_size, {"gate_proj": c.intermediate_size, "up_proj": c.intermediate_size},
            bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [T, H] -> [T, H]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    attention_class: type[LlamaAttention] = LlamaAttention
    # The sublayers whose outputs are added to the residual stream. Under tensor parallelism
    # each ends in a row-parallel linear, so its output is summed over the ranks first
    # (distributed/parallel_linear.py).
    residual_branches = ("self_attn", "mlp")

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = self.attention_class(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, attn, kv_cache):  # x [T, H] -> [T, H]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: ModelConfig, decoder_layer: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(decoder_layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # Built once per layer from the config; called as layer(x, cos, sin, attn, kv_cache).
    decoder_layer: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.decoder_layer)
        # Tied embeddings: no lm_head parameter at all; the logits reuse embed_tokens.weight.
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        # Built on the CPU even under a meta-device context; the loader moves it with the model.
        with torch.device("cpu"):
            cache = rope_cache(config.head_dim, config.max_position_embeddings, config.rope_theta,
                               config.rope_scaling)
        self.register_buffer("rope", cache, persistent=False)  # [P, 2, D] float32

    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rope[positions].to(x.dtype).unsqueeze(2).unbind(1)  # [T, 1, D] each
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, attn, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, H] -> logits [N, V] float32."""
        if self.lm_head is None:  # tied embeddings
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
