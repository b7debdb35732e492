"""Tiny random-weight checkpoints of every served family, saved in Hugging Face format with a real
tokenizer (the default model's, SmolLM2's BPE), for parity tests against transformers.

Every family: 2 layers, hidden 64, 4 attention heads with 2 KV heads, initializer_range 1.0 so
that greedy choices have clear margins (float32 summation order never flips an argmax).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen2_tied", "mixtral")
SLIDING_WINDOW = 16  # the tiny Mistral's window: test prompts run longer than this
MAX_POSITIONS = 512

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
               rms_norm_eps=1e-5, initializer_range=1.0, tie_word_embeddings=False)


def tiny_config(family: str, tokenizer):
    """The transformers config of one tiny family member, with the tokenizer's special ids."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    if family == "llama":
        return LlamaConfig(**_COMMON, **ids, rope_parameters={"rope_type": "default",
                                                               "rope_theta": 10000.0})
    if family == "llama3":  # Llama 3.1+ frequency-dependent scaling, original context 64
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        return LlamaConfig(**_COMMON, **ids, rope_parameters=rope)
    if family == "mistral":
        return MistralConfig(**_COMMON, **ids, sliding_window=SLIDING_WINDOW)
    if family in ("qwen2", "qwen2_tied"):  # QKV bias is part of the architecture
        common = _COMMON | {"tie_word_embeddings": family == "qwen2_tied"}
        return Qwen2Config(**common, **ids, use_sliding_window=False)
    if family == "mixtral":
        return MixtralConfig(**_COMMON, **ids, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=None)
    raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")


def save_tiny_checkpoint(family: str, path: Path, tokenizer, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `family` with `tokenizer` into `path`; returns it.

    Weights are drawn in float32 from a fixed seed; biases (Qwen2's q/k/v) are drawn too, since
    transformers initialises them to zero and a zero bias would prove nothing."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 1.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
