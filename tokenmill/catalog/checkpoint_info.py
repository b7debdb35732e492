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
from typing import BinaryIO

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
    for shard in path.glob("*.safetensors"):
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
    fields, num_parameters = read_gguf_header(path)
    arch = fields.get("general.architecture", "")
    # llama.cpp writes Mistral as "llama", and Mixtral as "llama" with experts.
    family = "mixtral" if arch == "llama" and fields.get("llama.expert_count", 0) else arch
    return CheckpointInfo(family if family in FAMILIES else UNKNOWN,
                          int(fields.get(f"{arch}.context_length", 0)), num_parameters)


# GGUF value types (the gguf spec's GGUFValueType): scalar struct formats, a string, an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[dict, int]:
    """(scalar and string metadata by key, total elements of all tensors) of a GGUF file; arrays
    (the tokenizer's vocabulary and merges) are skipped, not decoded."""
    with open(path, "rb") as f:
        magic, version, num_tensors, num_fields = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version < 2:
            raise ValueError("not a GGUF file (version 2 or later)")
        fields = {}
        for _ in range(num_fields):
            key = _read_string(f)
            (value_type,) = struct.unpack("<I", f.read(4))
            if value_type == _ARRAY:
                _skip_array(f)
            else:
                fields[key] = _read_value(f, value_type)
        num_parameters = 0
        for _ in range(num_tensors):  # name, n_dims, dims, ggml type, data offset
            _read_string(f)
            (n_dims,) = struct.unpack("<I", f.read(4))
            num_parameters += math.prod(struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims)))
            f.seek(12, 1)
    return fields, num_parameters


def _read_string(f: BinaryIO) -> str:
    (size,) = struct.unpack("<Q", f.read(8))
    return f.read(size).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, value_type: int):
    if value_type == _STRING:
        return _read_string(f)
    fmt = _SCALARS[value_type]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _skip_array(f: BinaryIO) -> None:
    item_type, count = struct.unpack("<IQ", f.read(12))
    if item_type in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
        return
    for _ in range(count):
        if item_type == _STRING:
            (size,) = struct.unpack("<Q", f.read(8))
            f.seek(size, 1)
        else:
            _skip_array(f)
