"""GGUF source for the model-loading stage: config from llama.cpp's metadata, tokenizer via
transformers, weights via gguf's dequantization.

Config: the metadata keys llama.cpp writes for our families ("llama", which also carries Mistral
and Mixtral, and "qwen2") mapped to a transformers config (`gguf_hf_config`): transformers' own
GGUF config conversion knows no experts, no RoPE scaling and no `rope_freqs`, and re-parses the
whole file with gguf.GGUFReader (seconds). Tokenizer: transformers rebuilds it from the
vocabulary and merges (seconds). Both are saved once in HF form under
`$TOKENMILL_HOME/cache/gguf/<key>/`, keyed by the file's path, size and mtime, transformers'
version and this module's format, and later starts read that instead (a tenth of a second).

Weights are memory-mapped (gguf_file.py), dequantized to float32 one tensor (one expert of a
stacked tensor) at a time, renamed to Hugging Face names and, for the "llama" architecture,
un-permuted: llama.cpp's LlamaModel converter interleaves the two rotary halves of every q/k head
(weights and biases); we restore HF's rotate-half layout exactly as transformers'
`LlamaTensorProcessor._reverse_permute_weights` does. Qwen2's converter does not permute.
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
from tokenmill.models.gguf_file import GGUFFile, read_gguf

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
    "ffn_gate_inp": "block_sparse_moe.gate",  # Mixtral's router
}
# Mixtral's experts: stacked [E, ...] as "ffn_gate_exps" etc., or one tensor per expert as
# "ffn_gate.{e}" in files converted before llama.cpp stacked them (spring 2024).
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_EXPERT_RE = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)(_exps|\.\d+)\.weight")
_IN_CONFIG = {"rope_freqs.weight"}  # read by gguf_hf_config, not a weight
_PERMUTED_ARCHS = {"llama"}  # llama.cpp stores Mistral and Mixtral GGUFs as "llama" too
_CACHE_FORMAT = 2  # bumped when gguf_hf_config changes what a cached config holds


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
    config = gguf_hf_config(read_gguf(path))
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


def gguf_hf_config(gguf: GGUFFile):
    """The transformers config of a llama.cpp GGUF of our families, from `{arch}.*` metadata:

    - `expert_count` / `expert_used_count`: llama.cpp writes Mixtral as "llama" with experts.
    - `rope.scaling.type` "linear" and its factor; others (yarn) are refused here, loudly.
    - the `rope_freqs` tensor (Llama 3.1+ scaling, as divisors of each frequency):
      `gguf_rope_freqs` on the config, read by ModelConfig.from_hf.
    - `attention.sliding_window`, else no window: llama.cpp runs "llama" with full attention.
    - tied embeddings when there is no `output.weight`, as llama.cpp decides."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config

    meta = gguf.metadata
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported; supported: "
                                  "llama (Llama, Mistral, Mixtral), qwen2")

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope |= {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise NotImplementedError(f"GGUF rope scaling {scaling!r} is not supported (supported: "
                                  "linear, and Llama 3's as rope_freqs)")
    heads = key("attention.head_count")
    window = key("attention.sliding_window")
    names = {t.name for t in gguf.tensors}
    common = dict(
        vocab_size=key("vocab_size") or meta["tokenizer.ggml.tokens"],  # the list's length
        hidden_size=key("embedding_length"), intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"), num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        max_position_embeddings=key("context_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"), rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    common = {name: value for name, value in common.items() if value is not None}  # defaults
    if arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=window is not None,
                             sliding_window=window)
    elif key("expert_count"):
        config = MixtralConfig(**common, head_dim=key("rope.dimension_count"),
                               num_local_experts=key("expert_count"),
                               num_experts_per_tok=key("expert_used_count"), sliding_window=window)
    else:
        config = LlamaConfig(**common, head_dim=key("rope.dimension_count"))
    freqs = next((t for t in gguf.tensors if t.name in _IN_CONFIG), None)
    if freqs is not None:  # F32 [D/2]
        config.gguf_rope_freqs = freqs.data.view(np.float32).tolist()
    return config


def metadata_cache_key(path: Path) -> str:
    """Changes when the file (path, size, mtime) or the converter (transformers' version, our
    format) does."""
    import transformers

    st = path.stat()
    ident = (f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
             f"|{_CACHE_FORMAT}")
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def gguf_weight_bits(path: Path) -> float:
    """Bits per weight, scales included, of the widest type among the file's decoder-layer
    matrices (Q4_1: 5.0, Q8_0: 8.5, F16: 16): the precision its layers' linears were stored at.
    Embeddings and the output head, often kept wider, are not counted."""
    from gguf.constants import GGML_QUANT_SIZES

    bits = [GGML_QUANT_SIZES[t.qtype][1] * 8 / GGML_QUANT_SIZES[t.qtype][0]
            for t in read_gguf(path).tensors if t.name.startswith("blk.") and len(t.shape) >= 2]
    if not bits:
        raise ValueError(f"{path.name}: no decoder-layer weight matrices")
    return max(bits)


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors we do not use. For a stacked
    expert tensor ([E, ...]) it is a template whose "{}" is the expert index."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _EXPERT_RE.fullmatch(gguf_name)
    if m is not None:
        layer, kind, which = m.groups()
        expert = "{}" if which == "_exps" else which[1:]
        return (f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
                f"{_EXPERT_NAMES[kind]}.weight")
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
    gguf = read_gguf(path)
    arch = gguf.metadata["general.architecture"]
    heads = {".attn_q.": num_heads, ".attn_k.": num_kv_heads} if arch in _PERMUTED_ARCHS else {}
    for t in tqdm(gguf.tensors, desc=f"loading {path.name}", unit="tensor"):
        if t.name in _IN_CONFIG:
            continue
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{path.name}: tensor {t.name!r} has no known mapping")
        if "{}" in name:  # stacked experts: one expert's rows at a time, sliced before dequant
            for e in range(t.shape[0]):
                yield name.format(e), _dequantize(t.data[e], t.qtype, t.shape[1:])
        else:
            n_head = next((n for part, n in heads.items() if part in t.name), None)
            yield name, _dequantize(t.data, t.qtype, t.shape, n_head)
        gguf.release(t)


def _dequantize(data: np.ndarray, qtype, shape: tuple[int, ...],
                n_head: int | None = None) -> torch.Tensor:
    """GGUF bytes (a read-only view of the file) -> float32 tensor of `shape`, un-permuted over
    `n_head` heads when given; the result owns its memory."""
    from gguf.quants import dequantize

    w = dequantize(data, qtype).reshape(shape)  # numpy float32
    if n_head is not None:
        w = unpermute_rope(w, n_head)
    w = np.ascontiguousarray(w, dtype=np.float32)
    return torch.from_numpy(w if w.flags.writeable else w.copy())  # a read-only view is the file
