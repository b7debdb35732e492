"""Model registry: architecture name -> model class, imported lazily.

Stage: model loading. The loader asks `model_class(config)` which class to build; unsupported
features of a supported family fail here, loudly, before any weight is read.
"""

from __future__ import annotations

import importlib

from torch import nn

from tokenmill.config import ModelConfig

# architecture -> (module, class name); the module is imported only when the model is built.
_MODELS = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
}

# Families we know of and will support, each a later issue.
_LATER = {
    "Qwen2ForCausalLM": "Qwen2 (qkv bias) is not supported yet; it is a later issue",
    "MixtralForCausalLM": "Mixtral (mixture of experts) is not supported yet; it is a later issue",
}


def model_class(config: ModelConfig, max_model_len: int | None = None) -> type[nn.Module]:
    """The class that implements `config.architecture`, or a clear error saying why not."""
    arch = config.architecture
    if arch in _LATER:
        raise NotImplementedError(_LATER[arch])
    if arch not in _MODELS:
        raise NotImplementedError(
            f"architecture {arch!r} is not supported; supported: {', '.join(sorted(_MODELS))}"
        )
    if config.rope_scaling is not None:
        raise NotImplementedError(
            f"rope_scaling {config.rope_scaling!r} (e.g. Llama-3.1 'llama3' scaling) is not "
            "supported yet; it is a later issue"
        )
    if config.attention_bias:
        raise NotImplementedError(f"{arch} with attention_bias is not supported yet")
    window = config.sliding_window
    limit = max_model_len or config.max_position_embeddings
    if window is not None and window < limit:
        raise NotImplementedError(
            f"{arch} uses a sliding window of {window} tokens, shorter than the context of "
            f"{limit}; sliding-window attention is a later issue (lower max_model_len to {window} "
            "to serve it with full attention)"
        )
    module, name = _MODELS[arch]
    return getattr(importlib.import_module(module), name)
