"""Model registry: architecture name -> model class, imported lazily.

Stage: model loading. The loader asks `model_class(config)` which class to build; unsupported
features of a supported family fail here, loudly, before any weight is read.
"""

from __future__ import annotations

import importlib

from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.models.rope import SUPPORTED_ROPE_TYPES

# architecture -> (module, class name); the module is imported only when the model is built.
_MODELS = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.models.qwen2", "Qwen2ForCausalLM"),
    "MixtralForCausalLM": ("tokenmill.models.mixtral", "MixtralForCausalLM"),
}

# Architectures whose reference applies `config.sliding_window` in every layer; the engine does it
# for them (CacheConfig.sliding_window: windowed attention, blocks out of the window freed).
_SLIDING_WINDOW = {"MistralForCausalLM", "MixtralForCausalLM"}


def model_class(config: ModelConfig, max_model_len: int | None = None) -> type[nn.Module]:
    """The class that implements `config.architecture`, or a clear error saying why not."""
    arch = config.architecture
    if arch not in _MODELS:
        raise NotImplementedError(
            f"architecture {arch!r} is not supported; supported: {', '.join(sorted(_MODELS))}"
        )
    rope_type = (config.rope_scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); its attention scaling and frequency ramp are "
            "not implemented"
        )
    if config.attention_bias:  # Llama's attention_bias puts a bias on o_proj too; Qwen2's not
        raise NotImplementedError(f"{arch} with attention_bias is not supported yet")
    if (arch == "MixtralForCausalLM") != (config.num_local_experts > 0):
        raise NotImplementedError(
            f"{arch} with num_local_experts={config.num_local_experts}: routed experts are "
            "MixtralForCausalLM's, and it needs them")
    window = config.sliding_window
    limit = max_model_len or config.max_position_embeddings
    if window is not None and window < limit and arch not in _SLIDING_WINDOW:
        raise NotImplementedError(
            f"{arch} with a sliding window of {window} tokens, shorter than the context of "
            f"{limit}, is not supported (lower max_model_len to {window} to serve it with full "
            "attention)"
        )
    module, name = _MODELS[arch]
    return getattr(importlib.import_module(module), name)
