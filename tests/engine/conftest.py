"""Engine test fixtures: the default model's real tokenizer (byte-level BPE), loaded once."""

import pytest


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name
    )
