"""Hugging Face checkpoint-directory source for the model-loading stage.

config.json, tokenizer files (with the chat template from tokenizer_config.json),
generation_config.json's eos ids, and single or sharded safetensors weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def load_hf_config_and_tokenizer(path: Path):
    """(hf_config, tokenizer) from the checkpoint directory."""
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def hf_weight_bits(hf_config) -> float:
    """Bits per weight of the checkpoint as its config states them (torch_dtype; float32 when
    unstated, transformers' own default)."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return float(dtype.itemsize * 8) if isinstance(dtype, torch.dtype) else 32.0


def generation_eos_ids(path: Path) -> tuple[int, ...]:
    """eos_token_id of generation_config.json (an int or a list), () when absent."""
    file = path / "generation_config.json"
    if not file.exists():
        return ()
    eos = json.loads(file.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: the shards named by the index, or the single file."""
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE).exists():
        return [path / SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{path}: no safetensors weights (.bin checkpoints are not read)")
    return found


def iter_hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of every shard, with a progress bar over tensors.

    One shard is open at a time and each tensor is read with pread(2) into its own anonymous
    buffer: nothing stays mapped, so the only memory a tensor holds is its own, and the caller
    may keep it as the served weight (no page of the file is ever counted in RSS)."""
    from safetensors import safe_open

    files = safetensors_files(path)
    total = 0
    for f in files:  # reads the headers only
        with safe_open(str(f), framework="pt", backend="pread") as handle:
            total += len(handle.keys())
    with tqdm(total=total, desc=f"loading {path.name}", unit="tensor") as bar:
        for f in files:
            with safe_open(str(f), framework="pt", backend="pread") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
                    bar.update()
