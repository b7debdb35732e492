"""GGUF source for the model-loading stage: config and tokenizer via transformers, weights via gguf.

Config and tokenizer: transformers converts the GGUF metadata (seconds: it rebuilds the BPE
tokenizer from the vocabulary and merges); the result is saved once in HF form under
`$TOKENMILL_HOME/cache/gguf/<key>/`, keyed by the file's path, size and mtime and transformers'
version, and later starts read that instead (a tenth of a second).

Weights are read with `gguf.GGUFReader`, dequantized to float32 one tensor at a time, renamed to
Hugging Face names and, for the llama family, un-permuted: llama.cpp's converter interleaves the
two rotary halves of every q/k head; we restore HF's rotate-half layout exactly as transformers'
`LlamaTensorProcessor._reverse_permute_weights` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenmill.models.default import tokenmill_home

log = logging.getLogger(__name__)

# GGUF tensor name -> HF name; "{}" is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_PERMUTED_ARCHS = {"llama"}  # llama.cpp stores Mistral GGUFs as "llama" too


def load_gguf_config_and_tokenizer(path: Path, cache_root: Path | None = None):
    """(hf_config, tokenizer) from the GGUF metadata; the tokenizer carries the chat template.

    `cache_root` (default `$TOKENMILL_HOME/cache/gguf`) keeps the converted pair; a cache that
    cannot be written only costs the conversion next time."""
    from transformers import AutoConfig, AutoTokenizer

    cache_root = tokenmill_home() / "cache" / "gguf" if cache_root is None else cache_root
    cached = cache_root / metadata_cache_key(path)
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        return AutoConfig.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
    log.info("converting the config and tokenizer of %s (cached for later starts)", path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
    try:
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(cached)  # atomic: a reader sees the whole entry or none
    except OSError as exc:  # read-only home, full disk, or another process won the rename
        log.debug("not caching GGUF metadata at %s: %s", cached, exc)
        shutil.rmtree(partial, ignore_errors=True)
    return config, tokenizer


def metadata_cache_key(path: Path) -> str:
    """Changes when the file (path, size, mtime) or the converter (transformers' version) does."""
    import transformers

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: w [n_head * D, ...] with each head's rows (2, D/2)
    interleaved -> rows in rotate-half order."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iter_gguf_weights(path: Path, num_heads: int, num_kv_heads: int
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor in HF layout) for every model tensor, with a progress bar."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor"):
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{path.name}: tensor {t.name!r} has no known mapping")
        w = dequantize(t.data, t.tensor_type)  # numpy, logical shape (reversed GGUF ne)
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
        if arch in _PERMUTED_ARCHS and ".attn_q." in t.name:
            w = unpermute_rope(w, num_heads)
        elif arch in _PERMUTED_ARCHS and ".attn_k." in t.name:
            w = unpermute_rope(w, num_kv_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        yield name, torch.from_numpy(w if w.flags.writeable else w.copy())
