"""Engine test fixtures: the default model's real tokenizer (byte-level BPE), loaded once, and
engines over the tiny random Llama (tests/tiny_models.py), which carries that same tokenizer."""

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine

KV_BYTES_PER_TOKEN = 512  # the tiny Llama: 2 layers x K and V x 2 KV heads x 16 dims x 4 bytes


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name
    )


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint):
    """(checkpoint path, LoadedModel) of the tiny Llama, loaded once, float32 on CPU."""
    from tokenmill.models.loader import load_model

    path = tiny_checkpoint("llama")
    return path, load_model(str(path), torch.float32, torch.device("cpu"))


@pytest.fixture
def tiny_config(tiny_llama):
    """tiny_config(num_blocks=..., **options) -> EngineConfig of the tiny Llama: float32, CPU,
    blocks of 4 tokens, a token budget of 16 per step, context 256 unless told."""
    path, _ = tiny_llama

    def make(num_blocks: int = 256, **options) -> EngineConfig:
        options = {"max_model_len": 256, "block_size": 4, "max_num_batched_tokens": 16,
                   **options}
        gib = num_blocks * options["block_size"] * KV_BYTES_PER_TOKEN / (1 << 30)
        return EngineConfig(model=str(path), dtype="float32", device="cpu", kv_cache_gib=gib,
                            **options)

    return make


@pytest.fixture
def tiny_engine(tiny_llama, tiny_config):
    """tiny_engine(**tiny_config options) -> a fresh LLMEngine sharing the tiny Llama's weights."""
    return lambda **options: LLMEngine(tiny_config(**options), loaded=tiny_llama[1])
