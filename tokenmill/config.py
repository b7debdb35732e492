"""Frozen engine configuration, resolved once at start-up.

Each component takes the sub-config it uses: the block manager a CacheConfig, the scheduler a
SchedulerConfig, the runner the ModelConfig. "auto" values are resolved by `EngineConfig.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


BF16_ON_CPU_ABOVE = 1_000_000_000  # parameters; at or below, `auto` serves float32 on CPU


def resolve_dtype(name: str, device: torch.device, num_parameters: int) -> torch.dtype:
    """`auto` is bfloat16 on CUDA. On CPU it is float32 up to BF16_ON_CPU_ABOVE parameters (the
    oneDNN-packed float32 path is the fast one, and bf16 GEMM is slow without AVX512_BF16/AMX),
    bfloat16 above, where float32 would need 4 bytes per parameter (28 GB for a 7B model)."""
    if name == "auto":
        if device.type == "cuda" or num_parameters > BF16_ON_CPU_ABOVE:
            return torch.bfloat16
        return torch.float32
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
    max_position_embeddings: int  # the context length served (x factor for linear/dynamic RoPE)
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]  # every id that ends generation (config + generation_config)
    bos_token_id: int | None = None
    rope_scaling: dict | None = None  # HF rope_parameters when not "default" (models/rope.py)
    sliding_window: int | None = None  # None: full attention in every layer
    attention_bias: bool = False  # Llama's bias on q, k, v and o (not Qwen2's q/k/v-only bias)
    num_local_experts: int = 0  # Mixtral: experts per layer (0 = dense MLP)
    num_experts_per_tok: int = 0

    @classmethod
    def from_hf(cls, hf_config, extra_eos_ids: tuple[int, ...] = ()) -> ModelConfig:
        """Build from a transformers PretrainedConfig (from config.json or GGUF metadata)."""
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        scaling, max_positions = _rope_scaling(c, rope)
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
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            eos_token_ids=tuple(dict.fromkeys(eos_ids + tuple(extra_eos_ids))),
            bos_token_id=getattr(c, "bos_token_id", None),
            rope_scaling=scaling,
            sliding_window=_sliding_window(c),
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


def _rope_scaling(c, rope: dict) -> tuple[dict | None, int]:
    """(RoPE scaling for models/rope.py or None, context length served) of a HF config.

    linear and dynamic scaling serve HF's max_position_embeddings x factor (HF's dynamic takes
    max_position_embeddings as the original context; vLLM serves both that far); llama3 configs
    state the extended context themselves. A GGUF's llama.cpp `rope_freqs` divisors, which the
    GGUF loader puts on the config as `gguf_rope_freqs`, become the `freq_factors` type."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    max_positions = c.max_position_embeddings
    freqs = getattr(c, "gguf_rope_freqs", None)
    if freqs is not None:
        return {"rope_type": "freq_factors", "freq_factors": list(freqs)}, max_positions
    if kind == "default":
        return None, max_positions
    if kind in ("linear", "dynamic"):
        max_positions = int(max_positions * rope["factor"])
    return {**rope, "rope_type": kind}, max_positions


def _sliding_window(c) -> int | None:
    """The attention window of every layer, None for full attention. Qwen2 configs carry a window
    even when `use_sliding_window` is false; HF slides only the layers marked so in layer_types."""
    window = getattr(c, "sliding_window", None)
    if window is None or getattr(c, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(c, "layer_types", None) or ["sliding_attention"]
    if "sliding_attention" not in layer_types:
        return None
    if any(t != "sliding_attention" for t in layer_types):
        raise NotImplementedError(
            f"a sliding window in some layers only ({layer_types}) is not supported")
    return window


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # 0 until resolved from kv_cache_gib
    kv_cache_gib: float = 1.0  # memory for K and V of all layers
    enable_prefix_caching: bool = True
    # W: each query attends to the last W positions, itself included, and the blocks before them
    # are freed; None: full attention (no window, or one no shorter than max_model_len).
    sliding_window: int | None = None


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
    # CPU float32 linears: auto | none | bf16 | int8 | int4 (runner/linear_plan.py). none, the
    # library's default, keeps the float32 reference; `tokenmill serve` defaults to auto.
    quantization: str = "none"
    # K ranks (processes on this node) sharing each layer's heads and hidden units, rank 0 this
    # engine (tokenmill/distributed); 1: one process, nothing of torch.distributed started.
    # kv_cache_gib is then the memory of all ranks' caches together (each holds 1/K of it).
    tensor_parallel_size: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)  # filled by resolve()
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # filled by resolve()

    def resolve(self, model_config: ModelConfig, kv_bytes_per_token: int) -> EngineConfig:
        """Fill the sub-configs from the model, once. `kv_bytes_per_token` covers all layers."""
        max_len = min(self.max_model_len or model_config.max_position_embeddings,
                      model_config.max_position_embeddings)
        window = model_config.sliding_window
        if window is not None and window >= max_len:
            window = None  # no position ever reaches past it: full attention is the same
        block_bytes = kv_bytes_per_token * self.block_size
        num_blocks = int(self.kv_cache_gib * (1 << 30)) // block_bytes
        # One request must fit in the cache alone: all its tokens, or, under a sliding window,
        # the blocks of its window and of one step's chunk, which is all it ever holds.
        held = (max_len if window is None else
                min(max_len, window_span_blocks(window, self.max_num_batched_tokens,
                                                self.block_size) * self.block_size))
        if num_blocks * self.block_size < held:
            raise ValueError(
                f"kv_cache_gib={self.kv_cache_gib} holds {num_blocks * self.block_size} tokens, "
                f"fewer than one request of max_model_len={max_len} needs ({held}); raise it or "
                "lower max_model_len"
            )
        cache = CacheConfig(self.block_size, num_blocks, self.kv_cache_gib,
                            self.enable_prefix_caching, window)
        sched = SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, max_len)
        return replace(self, max_model_len=max_len, cache=cache, scheduler=sched)


def window_span_blocks(window: int, num_new_tokens: int, block_size: int) -> int:
    """Most blocks a request holds under a sliding window in a step computing `num_new_tokens`
    tokens from position c: those of positions [c - window + 1, c + num_new_tokens), the window
    of its first query through its last token, at worst starting on a block's last slot."""
    span = window - 1 + num_new_tokens
    return (span + block_size - 2) // block_size + 1
