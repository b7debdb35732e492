"""The GGUF container, read lazily: metadata and tensor layout from the header, tensor data as
read-only views of a memory map. Stage: model loading (gguf_loader.py maps what this reads).

gguf.GGUFReader parses every element of every metadata array into its own numpy part, so the
vocabulary and merges of a BPE tokenizer (~100k strings) cost it seconds at each open; here
string arrays are only stepped over (their length is kept: the tokenizer is transformers'
business) and numeric arrays are read whole. Block layouts and dequantization stay gguf's.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # logical shape, outermost first (GGUF's ne reversed)
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [*shape[:-1], bytes per row]: a read-only view of the file
    offset: int  # where `data` starts in the file


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]  # key -> scalar, string or numeric array; a string array -> length
    tensors: list[GGUFTensor]  # in file order
    mapping: mmap.mmap  # the whole file, read-only

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the tensor's pages from this process's memory once it is converted (they are
        re-read from the file if touched again), so a load never holds the file and the
        converted weights at once."""
        start = tensor.offset // mmap.PAGESIZE * mmap.PAGESIZE
        self.mapping.madvise(mmap.MADV_DONTNEED, start, tensor.offset + tensor.data.nbytes - start)


class _Cursor:
    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return self.buf[self.pos - n:self.pos].tobytes().decode("utf-8")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(_SCALAR[vtype])
        itype, n = self.scalar("<I"), self.scalar("<Q")
        if itype in _SCALAR:  # numeric: one view of n items
            array = np.frombuffer(self.buf, _SCALAR[itype], n, self.pos)
            self.pos += array.nbytes
            return array
        for _ in range(n):  # strings (or nested arrays): stepped over
            self.value(itype)
        return n


def read_gguf(path: Path) -> GGUFFile:
    """The metadata and tensors of a little-endian GGUF v2/v3 file; no tensor data is read."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(mapping, dtype=np.uint8)
    c = _Cursor(buf)
    if buf[:4].tobytes() != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    c.pos = 4
    version = c.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not read (2 and 3 are; a huge "
                         "number is a big-endian file)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        ne = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        infos.append((name, tuple(reversed(ne)), GGMLQuantizationType(c.scalar("<I")),
                      c.scalar("<Q")))
    align = metadata.get("general.alignment", 32)
    start = -(-c.pos // align) * align  # tensor data begins at the next aligned offset
    tensors = []
    for name, shape, qtype, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * block_bytes
        begin = start + offset
        data = buf[begin:begin + math.prod(shape[:-1]) * row_bytes]
        tensors.append(GGUFTensor(name, shape, qtype, data.reshape(*shape[:-1], row_bytes),
                                  begin))
    return GGUFFile(metadata, tensors, mapping)
