"""Model loading stage: a model spec (a GGUF file or a HF checkpoint directory) -> LoadedModel.

Two steps, so that the served dtype can depend on the model's size: `open_model` reads the config
and tokenizer and builds the model on the meta device (no random init, no second copy of the
weights); `load_weights` then streams each weight from its source, casts it to the served dtype
and assigns it in place. `load_model` does both. A tensor-parallel rank opens the model, then
takes its shard (`OpenedModel.sharded`): its module is built from its part of the config, and
each weight streamed is cut to the rank's part before it is cast and kept
(distributed/parallel_linear.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.distributed.parallel_linear import TensorShard, shard_config
from tokenmill.models.gguf_loader import (gguf_weight_bits, iter_gguf_weights,
                                         load_gguf_config_and_tokenizer)
from tokenmill.models.hf_loader import (generation_eos_ids, hf_weight_bits, iter_hf_weights,
                                        load_hf_config_and_tokenizer)
from tokenmill.models.llama import MergedLinear
from tokenmill.models.registry import model_class


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, weights in the served dtype on the served device
    config: ModelConfig  # what the engine needs to know of the architecture (the whole model's)
    tokenizer: Any  # a transformers tokenizer, with the chat template
    weight_bits: float  # of the source's layer weights: 5.0 for a Q4_1 GGUF, 16 for bf16 files
    shard: TensorShard = TensorShard()  # the tensor-parallel rank `model` holds the part of


@dataclass
class OpenedModel:
    """A model spec with its config and tokenizer read and its module built on the meta device:
    everything but the weights, so that the served dtype can be chosen from the architecture
    before a byte of them is read. `load_weights` consumes it."""

    path: Path  # the GGUF file or the checkpoint directory
    model: nn.Module  # on the meta device: shapes only (of `shard`'s part)
    config: ModelConfig  # the whole model's
    tokenizer: Any
    weight_bits: float  # bits per weight the source stores its layers' linears at
    shard: TensorShard = TensorShard()

    def num_parameters(self) -> int:
        """Parameters the loaded model will hold (a tied LM head counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    def sharded(self, shard: TensorShard) -> OpenedModel:
        """This model as tensor-parallel rank `shard.rank` of `shard.size` loads it (ValueError
        unless the size divides its heads and hidden units)."""
        with torch.device("meta"):
            model = type(self.model)(shard_config(self.config, shard.size))
        return replace(self, model=model, shard=shard)


def load_model(spec: str, dtype: torch.dtype, device: torch.device,
               max_model_len: int | None = None) -> LoadedModel:
    """Load a model to serve `max_model_len` tokens (None: the model's own context length)."""
    return load_weights(open_model(spec, max_model_len), dtype, device)


def open_model(spec: str, max_model_len: int | None = None) -> OpenedModel:
    """Read the config and tokenizer of a GGUF file or HF checkpoint directory and build its model
    on the meta device (no random init, no memory for weights)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        hf_config, tokenizer = load_gguf_config_and_tokenizer(path)
        extra_eos: tuple[int, ...] = ()
        weight_bits = gguf_weight_bits(path)
    elif path.is_dir() and (path / "config.json").exists():
        hf_config, tokenizer = load_hf_config_and_tokenizer(path)
        extra_eos = generation_eos_ids(path)
        weight_bits = hf_weight_bits(hf_config)
    else:
        raise FileNotFoundError(
            f"model {spec!r} is neither a .gguf file nor a directory with config.json")
    if tokenizer.eos_token_id is not None:
        extra_eos += (tokenizer.eos_token_id,)
    config = ModelConfig.from_hf(hf_config, extra_eos_ids=extra_eos)
    cls = model_class(config, max_model_len)
    with torch.device("meta"):
        model = cls(config)
    return OpenedModel(path, model, config, tokenizer, weight_bits)


def load_weights(opened: OpenedModel, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Stream the weights into the opened model, one tensor at a time, cast to dtype on device.

    Peak memory is the loaded weights plus one tensor in its source dtype (docs/BENCHMARKS.md,
    "Loading: peak memory"): safetensors are read without a memory map, and no source tensor
    outlives its assignment. A GGUF is memory-mapped: the pages of the file read so far count
    too. A tensor-parallel rank keeps only its part of each weight, cut from the source tensor
    before the cast (so the peak adds that part to the one source tensor)."""
    path, model, config, shard = opened.path, opened.model, opened.config, opened.shard
    if path.suffix == ".gguf":
        weights = iter_gguf_weights(path, config.num_attention_heads, config.num_key_value_heads)
    else:
        weights = iter_hf_weights(path)
    if shard.size > 1:
        weights = ((name, shard.slice_weight(name, tensor)) for name, tensor in weights)
    assign_weights(model, weights, dtype, device)
    return LoadedModel(model.to(device).eval(), config, opened.tokenizer, opened.weight_bits,
                       shard)


def assign_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                   dtype: torch.dtype, device: torch.device) -> None:
    """Replace every (meta) parameter of `model` by the named weight, cast to dtype on device.
    A projection the model stacks in a `MergedLinear` is copied into its rows of that linear's
    parameter. Unknown, repeated or mis-shaped weights and missing parameters are errors; a
    checkpoint's lm_head of a tied model is skipped (the model reuses embed_tokens)."""
    expected = dict(model.named_parameters())
    merged = _merged_rows(model)
    unfilled: dict[str, set[str]] = {}  # merged parameter -> checkpoint names still to copy
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in weights:
        target, rows = merged.get(name, (name, None))
        if rows is not None and name not in unfilled.get(target, {name}):
            raise ValueError(f"checkpoint weight {name!r} appears twice")
        if target not in expected:
            if tied and name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                continue
            raise KeyError(f"checkpoint weight {name!r} has no parameter in the model")
        shape = tuple(expected[target].shape)
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {shape}")
        module_name, _, attr = target.rpartition(".")
        module = model.get_submodule(module_name)
        if rows is None:
            # Same dtype and device: the source tensor itself becomes the weight (no copy).
            # Otherwise the source is dropped before the next one is read, so a load holds the
            # weights read so far plus one tensor in its source dtype.
            param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
            del tensor
            setattr(module, attr, param)
            del expected[target]
            continue
        if target not in unfilled:  # the first of its shards: the whole parameter, empty
            unfilled[target] = {n for n, (t, _) in merged.items() if t == target}
            setattr(module, attr, nn.Parameter(torch.empty(expected[target].shape, dtype=dtype,
                                                           device=device), requires_grad=False))
        with torch.no_grad():
            getattr(module, attr)[rows].copy_(tensor)
        del tensor
        unfilled[target].discard(name)
        if not unfilled[target]:
            del expected[target]
    if expected:
        missing = [n for t in sorted(expected) for n in sorted(unfilled.get(t, {t}))]
        raise KeyError(f"checkpoint lacks weights: {missing[:8]}")


def _merged_rows(model: nn.Module) -> dict[str, tuple[str, slice]]:
    """Checkpoint parameter name -> (the model parameter that holds it, its rows there), for
    every projection stacked in a MergedLinear: `...self_attn.k_proj.weight` ->
    (`...self_attn.qkv_proj.weight`, slice(q_size, q_size + kv_size))."""
    rows = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MergedLinear):
            parent = module_name.rpartition(".")[0]
            for attr, _ in module.named_parameters(recurse=False):
                for shard in module.shards:
                    rows[f"{parent}.{shard}.{attr}"] = (f"{module_name}.{attr}", module.rows(shard))
    return rows
