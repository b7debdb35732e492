"""Tensor parallelism, the model's side: what each of K ranks holds, and where the ranks sum.

Megatron-style sharding (Shoeybi et al. 2019), as vLLM does it. Rank r of K holds:

- column-parallel, rows [r*N/K, (r+1)*N/K) of each of these projections' N outputs: q, k and v
  (with Qwen2's bias), i.e. its N/K of the query heads and of the KV heads (K must divide both:
  KV heads are not replicated); gate and up, its N/K of the MLP's hidden units; and Mixtral's
  w1 and w3 of every expert (column sharding of every expert: each rank holds a slice of all of
  them). Each projection is split on its own before the loader stacks it into its MergedLinear,
  so rank r's qkv_proj is [q_r; k_r; v_r] and its gate_up_proj [gate_r; up_r].
- row-parallel, the input columns its own heads or units produce: o_proj, down_proj, every
  expert's w2. Their output is a partial sum, so the output of each residual branch (attention,
  MLP, the whole expert block) is summed over the ranks before it joins the residual stream
  (`install_all_reduce`): two all-reduces a layer. A row-parallel bias would be added once, after
  the sum; none of our families has one (the registry refuses Llama's attention_bias).
- the rest replicated: embeddings, LM head, norms, RoPE, and Mixtral's router, so every rank
  routes every token alike.

So a rank's model is the architecture with K times fewer heads and hidden units
(`shard_config`), run by the unchanged forward; attention, and the KV cache, see only the rank's
heads. After each all-reduce the hidden state is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import Tensor, nn

from tokenmill.config import ModelConfig

# The module names (HF's) of the sharded projections; their parent's name does not matter.
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "w2"})


@dataclass(frozen=True)
class TensorShard:
    """Which of `size` tensor-parallel ranks a model is loaded for."""

    rank: int = 0  # 0..size-1
    size: int = 1  # K; 1: the whole model

    def slice_weight(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's part of the checkpoint weight `name` (HF naming): a new tensor holding
        only that part for a sharded projection (so the caller may drop the whole one), else
        `tensor` itself."""
        module, _, attr = name.rpartition(".")
        module = module.rpartition(".")[2]
        if module in COLUMN_PARALLEL:
            dim = 0  # output rows; a bias [N] with them
        elif module in ROW_PARALLEL:
            assert attr == "weight", f"{name}: a row-parallel bias would be added after the sum"
            dim = 1  # input columns
        else:
            return tensor
        part = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * part, part).clone()


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """`config` as each of `size` ranks holds it: K times fewer query heads, KV heads and MLP
    (or expert) hidden units; hidden size, head size, vocabulary, layers and experts whole.
    ValueError, naming the sizes that would do, unless `size` divides all three."""
    counts = {"attention heads": config.num_attention_heads,
              "key-value heads": config.num_key_value_heads,
              "intermediate size": config.intermediate_size}
    if size < 1 or any(n % size for n in counts.values()):
        fits = [k for k in range(1, config.num_key_value_heads + 1)
                if not any(n % k for n in counts.values())]
        raise ValueError(
            f"--tensor-parallel-size {size} must divide the model's attention heads "
            f"({config.num_attention_heads}), key-value heads ({config.num_key_value_heads}; "
            f"they are split, not replicated) and intermediate size "
            f"({config.intermediate_size}): {', '.join(map(str, fits))} would")
    return replace(config, num_attention_heads=config.num_attention_heads // size,
                   num_key_value_heads=config.num_key_value_heads // size,
                   intermediate_size=config.intermediate_size // size)


def install_all_reduce(model: nn.Module, all_reduce: Callable[[Tensor], Tensor]) -> None:
    """Sum each decoder layer's residual branches (`residual_branches`: attention, then the MLP
    or the expert block) over the ranks: a forward hook on each replaces its output [T, H], a
    partial sum, by the total. Linears replaced later (runner/linear_plan.py) keep it."""
    for layer in model.model.layers:
        for name in layer.residual_branches:
            getattr(layer, name).register_forward_hook(lambda _m, _args, out: all_reduce(out))
