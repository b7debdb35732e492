"""Mixtral: the Llama architecture with a sparse mixture of experts in place of the MLP.

Stage: the model, one flat batch at a time (see llama.py). In every layer a router scores each
token against E experts (SwiGLU MLPs); the token goes through its top-k experts and their outputs
are summed, weighted by the router's softmax renormalised over those k (Mixtral of Experts,
Jiang et al. 2024, eq. 1-2; HF's MixtralTopKRouter). Parameter names are those of published
checkpoints: `block_sparse_moe.gate` and `block_sparse_moe.experts.{e}.w1/w2/w3` (w1 and w3
loaded into one `w13`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.config import ModelConfig
from tokenmill.models.llama import LlamaAttention, LlamaForCausalLM, MergedLinear, RMSNorm


class MixtralExpert(nn.Module):
    """One expert, a SwiGLU MLP: w2(silu(w1(x)) * w3(x)), w1 (gate) and w3 (up) as one
    matmul."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w13 = MergedLinear(c.hidden_size, {"w1": c.intermediate_size,
                                                "w3": c.intermediate_size}, bias=False)
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:  # [N, H] -> [N, H]
        gate, up = self.w13(x).chunk(2, dim=-1)  # [N, I] each
        return self.w2(F.silu(gate) * up)


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.gate = nn.Linear(c.hidden_size, c.num_local_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MixtralExpert(c) for _ in range(c.num_local_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (weights [T, k] float32 summing to 1, expert ids [T, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E], over all experts
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k] each
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: Tensor) -> Tensor:  # [T, H] -> [T, H]
        """Grouped: the T*k (token, expert) pairs sorted by expert, one matmul per expert that
        has tokens, each result weighted and added back to its token's row."""
        weights, experts = self.route(x)
        order = experts.flatten().argsort(stable=True)  # [T*k] pair ids grouped by expert
        tokens = order // self.top_k  # [T*k] the token of each sorted pair
        pair_weights = weights.flatten()[order]  # [T*k] float32
        counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)  # [T, H]
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:  # pairs start:start+n all go to this expert
                rows = tokens[start:start + n]
                y = expert(x[rows]) * pair_weights[start:start + n, None]  # [n, H] float32
                out.index_add_(0, rows, y.to(x.dtype))
                start += n
        return out


class MixtralDecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + experts(norm(x))."""

    residual_branches = ("self_attn", "block_sparse_moe")  # see LlamaDecoderLayer

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.block_sparse_moe = MixtralSparseMoeBlock(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, attn, kv_cache):  # x [T, H] -> [T, H]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer = MixtralDecoderLayer
