"""What a model's files say about it without loading it: family, context length and parameter
count, read from config.json and the safetensors headers, or from a GGUF file's header.

The catalog uses it to describe a checkpoint it has no entry for, and `tokenmill serve` to check
that the models it is asked for fit in memory before it loads any of them. Only headers are read:
a 140 GB checkpoint costs what its few kilobytes of JSON cost.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenmill.models.gguf_file import read_gguf
from tokenmill.models.hf_loader import safetensors_files

FAMILIES = ("llama", "mistral", "qwen2", "mixtral")  # the architectures tokenmill serves
UNKNOWN = "unknown"


@dataclass(frozen=True)
class CheckpointInfo:
    family: str  # one of FAMILIES, or UNKNOWN
    context_length: int  # max positions the files declare; 0 if they declare none
    num_parameters: int  # elements of every weight tensor


def checkpoint_info(path: Path) -> CheckpointInfo:
    """Describe a Hugging Face checkpoint directory or a GGUF file; ValueError naming the path
    if its files cannot be read as one."""
    try:
        return _directory_info(path) if path.is_dir() else _gguf_info(path)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ValueError(f"cannot read {path} as a checkpoint: {exc}") from None


def _directory_info(path: Path) -> CheckpointInfo:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "")
    num_parameters = 0
    for shard in safetensors_files(path):  # the index's shards: not consolidated.safetensors
        with open(shard, "rb") as f:
            # A safetensors file opens with the byte length of its JSON header, then the header:
            # {tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}.
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        num_parameters += sum(math.prod(t["shape"]) for name, t in header.items()
                              if name != "__metadata__")
    return CheckpointInfo(model_type if model_type in FAMILIES else UNKNOWN,
                          int(config.get("max_position_embeddings") or 0), num_parameters)


def _gguf_info(path: Path) -> CheckpointInfo:
    gguf = read_gguf(path)  # the header only: tensor data stays unread in the map
    fields = gguf.metadata
    arch = fields.get("general.architecture", "")
    # llama.cpp writes Mistral as "llama", and Mixtral as "llama" with experts.
    family = "mixtral" if arch == "llama" and fields.get("llama.expert_count", 0) else arch
    return CheckpointInfo(family if family in FAMILIES else UNKNOWN,
                          int(fields.get(f"{arch}.context_length", 0)),
                          sum(math.prod(t.shape) for t in gguf.tensors))
