"""Frozen engine configuration, resolved once at start-up.

Each component takes the sub-config it uses: the block manager a CacheConfig, the scheduler a
SchedulerConfig, the runner the ModelConfig. "auto" values are resolved by `EngineConfig.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (no fast bf16 GEMM without AVX512_BF16/AMX), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, in Hugging Face's vocabulary."""

    architecture: str  # registry key, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int  # the context length served
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]  # every id that ends generation (config + generation_config)
    bos_token_id: int | None = None
    rope_scaling: dict | None = None  # HF rope_scaling / rope_parameters when not "default"
    sliding_window: int | None = None
    attention_bias: bool = False  # qkv projections carry a bias (Qwen2)
    num_local_experts: int = 0  # Mixtral: experts per layer (0 = dense MLP)
    num_experts_per_tok: int = 0

    @classmethod
    def from_hf(cls, hf_config, extra_eos_ids: tuple[int, ...] = ()) -> ModelConfig:
        """Build from a transformers PretrainedConfig (from config.json or GGUF metadata)."""
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        eos = c.eos_token_id
        if eos is None:
            eos_ids = ()
        else:
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        archs = getattr(c, "architectures", None) or [_ARCH_BY_MODEL_TYPE[c.model_type]]
        return cls(
            architecture=archs[0],
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            eos_token_ids=tuple(dict.fromkeys(eos_ids + tuple(extra_eos_ids))),
            bos_token_id=getattr(c, "bos_token_id", None),
            rope_scaling=scaling,
            sliding_window=getattr(c, "sliding_window", None),
            attention_bias=bool(getattr(c, "attention_bias", False)),
            num_local_experts=getattr(c, "num_local_experts", 0) or 0,
            num_experts_per_tok=getattr(c, "num_experts_per_tok", 0) or 0,
        )


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # 0 until resolved from kv_cache_gib
    kv_cache_gib: float = 1.0  # memory for K and V of all layers
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # token budget of one step (decodes + prefill chunks)
    max_num_seqs: int = 64  # running requests at once
    max_model_len: int = 8192  # prompt + output tokens of one request


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a GGUF file or a Hugging Face checkpoint directory
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_gib: float = 1.0
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    cache: CacheConfig = field(default_factory=CacheConfig)  # filled by resolve()
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # filled by resolve()

    def resolve(self, model_config: ModelConfig, kv_bytes_per_token: int) -> EngineConfig:
        """Fill the sub-configs from the model, once. `kv_bytes_per_token` covers all layers."""
        max_len = min(self.max_model_len or model_config.max_position_embeddings,
                      model_config.max_position_embeddings)
        block_bytes = kv_bytes_per_token * self.block_size
        num_blocks = int(self.kv_cache_gib * (1 << 30)) // block_bytes
        if num_blocks * self.block_size < max_len:
            raise ValueError(
                f"kv_cache_gib={self.kv_cache_gib} holds {num_blocks * self.block_size} tokens, "
                f"fewer than one request of max_model_len={max_len}; raise it or lower "
                "max_model_len"
            )
        cache = CacheConfig(self.block_size, num_blocks, self.kv_cache_gib,
                            self.enable_prefix_caching)
        sched = SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, max_len)
        return replace(self, max_model_len=max_len, cache=cache, scheduler=sched)
