"""Shared fixtures: the real default model (loaded once per session) and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_path():
    from tokenmill.models.default import default_model_path as path

    return path()


@pytest.fixture(scope="session")
def loaded_default_model(default_model_path):
    from tokenmill.models.loader import load_model

    return load_model(str(default_model_path), torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-weight 2-layer HF Llama checkpoint (GQA 4/2 heads, vocab 300) with a tokenizer,
    a generation_config.json adding eos id 7, and the same weights saved sharded under
    'sharded/'."""
    from tokenizers import Tokenizer, models
    from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)

    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, 300)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for target, shard in ((path, "10GB"), (path / "sharded", "40KB")):
        model.save_pretrained(target, max_shard_size=shard)
        tok.save_pretrained(target)
        GenerationConfig(eos_token_id=[2, 7]).save_pretrained(target)
    return path
