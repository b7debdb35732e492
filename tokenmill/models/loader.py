"""Model loading stage: a model spec (a GGUF file or a HF checkpoint directory) -> LoadedModel.

The model is built on the meta device (no random init, no second copy of the weights), then each
weight is streamed from its source, cast to the served dtype and assigned in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.models.gguf_loader import iter_gguf_weights, load_gguf_config_and_tokenizer
from tokenmill.models.hf_loader import (generation_eos_ids, iter_hf_weights,
                                        load_hf_config_and_tokenizer)
from tokenmill.models.registry import model_class


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, weights in the served dtype on the served device
    config: ModelConfig  # what the engine needs to know of the architecture
    tokenizer: Any  # a transformers tokenizer, with the chat template


def load_model(spec: str, dtype: torch.dtype, device: torch.device,
               max_model_len: int | None = None) -> LoadedModel:
    """Load a model to serve `max_model_len` tokens (None: the model's own context length)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        hf_config, tokenizer = load_gguf_config_and_tokenizer(path)
        extra_eos: tuple[int, ...] = ()
    elif path.is_dir() and (path / "config.json").exists():
        hf_config, tokenizer = load_hf_config_and_tokenizer(path)
        extra_eos = generation_eos_ids(path)
    else:
        raise FileNotFoundError(
            f"model {spec!r} is neither a .gguf file nor a directory with config.json")
    if tokenizer.eos_token_id is not None:
        extra_eos += (tokenizer.eos_token_id,)
    config = ModelConfig.from_hf(hf_config, extra_eos_ids=extra_eos)
    cls = model_class(config, max_model_len)
    with torch.device("meta"):
        model = cls(config)
    if path.suffix == ".gguf":
        weights = iter_gguf_weights(path, config.num_attention_heads, config.num_key_value_heads)
    else:
        weights = iter_hf_weights(path)
    assign_weights(model, weights, dtype, device)
    return LoadedModel(model.to(device).eval(), config, tokenizer)


def assign_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                   dtype: torch.dtype, device: torch.device) -> None:
    """Replace every (meta) parameter of `model` by the named weight, cast to dtype on device.
    Unknown or mis-shaped weights and missing parameters are errors; a checkpoint's lm_head of a
    tied model is skipped (the model reuses embed_tokens)."""
    expected = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in weights:
        if name not in expected:
            if tied and name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                continue
            raise KeyError(f"checkpoint weight {name!r} has no parameter in the model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(expected[name].shape)}")
        module_name, _, attr = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        setattr(model.get_submodule(module_name), attr, param)
        del expected[name]
    if expected:
        raise KeyError(f"checkpoint lacks weights: {sorted(expected)[:8]}")
