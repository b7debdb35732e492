"""The `tokenmill` command line without a model loaded: how `serve` resolves its models and splits
KV memory (every refusal comes before anything loads), and what `models` prints."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokenmill.catalog.catalog import load_catalog
from tokenmill.cli import (ENGINE_OPTIONS, UsageError, build_parser, check_fits,
                           check_shared_limits, given_options, kv_shares, main, resolve_specs)
from tokenmill.config import EngineConfig

GIB = 1 << 30


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_kv_shares_split_a_total_evenly_or_take_one_per_model():
    assert kv_shares(3, None) == [1.0, 1.0, 1.0]  # the default, per model
    assert kv_shares(3, [6.0]) == [2.0, 2.0, 2.0]  # once: the total
    assert kv_shares(1, [0.25]) == [0.25]
    assert kv_shares(2, [1.5, 0.5]) == [1.5, 0.5]  # once per model, in --model order


@pytest.mark.parametrize("n, given, message", [
    (3, [1.0, 2.0], r"--kv-cache-gib given 2 times for 3 models: give it once \(the total, split "
                    r"evenly\) or once per --model, in the same order"),
    (1, [1.0, 2.0], r"given 2 times for 1 models"),
    (2, [1.0, 0.0], r"--kv-cache-gib must be positive, not 0.0"),
])
def test_kv_shares_refuse_anything_else(n, given, message):
    with pytest.raises(UsageError, match=message):
        kv_shares(n, given)


def test_check_fits_refuses_weights_and_kv_beyond_memory():
    check_fits([2 * GIB], [0.5, 0.5], 3 * GIB)  # exactly fits
    with pytest.raises(UsageError, match=r"^the models need about 3.5 GiB \(weights 2.5 GiB \+ KV "
                                         r"cache 1.0 GiB\) but this machine has 3.0 GiB of "
                                         r"memory: lower --kv-cache-gib"):
        check_fits([2 * GIB, GIB // 2], [0.5, 0.5], 3 * GIB)


def test_resolve_specs_reports_every_error_and_refuses_duplicates(home, tiny_checkpoint,
                                                                   default_model_path):
    catalog = load_catalog()
    llama = tiny_checkpoint("llama")
    resolved = resolve_specs(catalog, [str(llama), str(default_model_path)])
    assert [m.id for m in resolved] == [llama.name, "SmolLM2-135M-Instruct"]

    with pytest.raises(UsageError) as refused:
        resolve_specs(catalog, ["nope", "qwen/qwen-2-72b-instruct", str(llama), str(llama)])
    assert str(refused.value).splitlines() == [
        "unknown model 'nope': not a catalog id (see `tokenmill models`) nor a checkpoint "
        "directory or GGUF file",
        "qwen/qwen-2-72b-instruct is not downloaded: run `tokenmill pull "
        "qwen/qwen-2-72b-instruct`",
        f"{llama.name} given more than once: a server serves a model once",
    ]


def test_serve_refuses_before_loading_anything(home, tiny_checkpoint, capsys):
    llama, qwen = str(tiny_checkpoint("llama")), str(tiny_checkpoint("qwen2"))
    capsys.readouterr()  # writing the checkpoints' progress bars
    assert main(["serve", "--model", llama, "--model", "nope"]) == 2
    assert capsys.readouterr().err.startswith("tokenmill serve: unknown model 'nope'")
    assert main(["serve", "--model", llama, "--model", qwen, "--kv-cache-gib", "1",
                 "--kv-cache-gib", "1", "--kv-cache-gib", "1"]) == 2
    assert "--kv-cache-gib given 3 times for 2 models" in capsys.readouterr().err
    assert main(["serve", "--model", llama, "--device", "cpu", "--kv-cache-gib", "1e6"]) == 2
    assert "GiB of memory: lower --kv-cache-gib" in capsys.readouterr().err
    assert main(["serve", "--model", llama, "--device", "cpu", "--dtype", "float8"]) == 2
    assert "unknown dtype 'float8'" in capsys.readouterr().err
    assert not (home / "admin.key").exists()  # nothing was started
    assert main(["serve", "--model", llama, "--max-key-share", "2"]) == 2
    assert "max_key_share must be in (0, 1], not 2.0" in capsys.readouterr().err
    assert main(["serve", "--model", llama, "--max-pending-sequences", "0"]) == 2
    assert "max_pending_sequences must be >= 1, not 0" in capsys.readouterr().err


SQLITE_WITH_REDIS = ("tokenmill serve: --redis needs the store on PostgreSQL (--db "
                     "postgresql://... or $TOKENMILL_DB), not SQLite: the replicas sharing limits "
                     "in Redis must share one ledger, and several servers cannot share a SQLite "
                     "file\n")


def test_serve_with_redis_refuses_sqlite_and_no_auth_before_anything_starts(home, monkeypatch,
                                                                             capsys):
    monkeypatch.delenv("TOKENMILL_DB", raising=False)
    redis = ["serve", "--redis", "redis://127.0.0.1:6379/0"]
    assert main(redis) == 2  # the default store: SQLite in $TOKENMILL_HOME
    assert capsys.readouterr().err == SQLITE_WITH_REDIS
    assert main([*redis, "--db", f"sqlite:///{home / 'other.db'}"]) == 2
    assert capsys.readouterr().err == SQLITE_WITH_REDIS
    monkeypatch.setenv("TOKENMILL_DB", f"sqlite:///{home / 'env.db'}")
    assert main(redis) == 2
    assert capsys.readouterr().err == SQLITE_WITH_REDIS
    assert main([*redis, "--no-auth"]) == 2
    assert capsys.readouterr().err == ("tokenmill serve: --redis limits API keys, and --no-auth "
                                       "serves without any: drop one\n")
    assert list(home.iterdir()) == []  # no store, no admin key: nothing was started
    check_shared_limits("redis://127.0.0.1:6379/0", "postgresql://u@db.example/tokenmill", False)
    check_shared_limits("redis://127.0.0.1:6379/0", "postgres://u@db.example/tokenmill", False)
    check_shared_limits(None, "sqlite:///tokenmill.db", True)  # no --redis: anything goes


def test_serve_passes_only_the_engine_options_given_and_defaults_to_auto_quantization():
    args = build_parser().parse_args(["serve"])
    assert given_options(args, ENGINE_OPTIONS) == {"quantization": "auto"}
    args = build_parser().parse_args(["serve", "--no-prefix-caching", "--quantization", "none",
                                      "--max-num-seqs", "8"])
    assert given_options(args, ENGINE_OPTIONS) == {"quantization": "none", "max_num_seqs": 8,
                                            "enable_prefix_caching": False}
    config = EngineConfig(model="m", **given_options(args, ENGINE_OPTIONS))
    assert not config.enable_prefix_caching


class _FakeServer(ThreadingHTTPServer):
    """Answers GET /v1/models with `ids` for the Bearer key `key`, 401 otherwise."""

    def __init__(self, ids: list[str], key: str):
        super().__init__(("127.0.0.1", 0), _ModelsHandler)
        self.ids, self.key = ids, key
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ModelsHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        ok = self.path == "/v1/models" and \
            self.headers.get("Authorization") == f"Bearer {self.server.key}"
        body = json.dumps({"object": "list", "data": [{"id": i} for i in self.server.ids]}) \
            if ok else '{"error": {}}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture
def fake_server(home):
    (home / "admin.key").write_text("sk-tm-admin\n")
    server = _FakeServer(["SmolLM2-135M-Instruct", "my-local"], "sk-tm-admin")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_models_lists_the_catalog_what_is_local_and_what_is_served(home, fake_server, capsys):
    models = home / "models"
    (models / "org" / "pulled").mkdir(parents=True)
    (models / "org" / "pulled" / "config.json").write_text("{}")
    (models / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")  # the default, present
    (models / "stray.gguf").write_bytes(b"GGUF")
    (models / ".partial" / "org" / "half").mkdir(parents=True)
    (models / ".partial" / "org" / "half" / "config.json").write_text("{}")

    assert main(["models", "--url", fake_server.url]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        "ID                                 FAMILY   CONTEXT  USD/1M IN  USD/1M OUT  LOCAL  SERVED",
        "SmolLM2-135M-Instruct              llama       8192       0.02        0.04  yes    yes",
        "    SmolLM2 135M Instruct; needs any CPU; about 0.6 GB of RAM at float32 (the Q4_1 file "
        "is 98 MB)",
        "meta-llama/llama-3.3-70b-instruct  llama     131072       0.39        0.39  no     no",
        "    Llama 3.3 70B Instruct; needs 2x H100 80GB (bf16, ~141 GB of weights) or 1x H100 80GB "
        "at int4 (~40 GB); does not fit a laptop",
    ]
    assert lines[11] == \
        "microsoft/WizardLM-2-8x22B         mixtral    65536       0.65        0.65  no     no"
    assert lines[15:] == [
        "",
        f"Also served at {fake_server.url} (not in the catalog): my-local",
        "",
        "Local models not in the catalog (serve one with --model PATH):",
        f"    {models / 'org' / 'pulled'}",
        f"    {models / 'stray.gguf'}",
    ]


def test_models_without_a_server_or_without_the_key_says_so(home, fake_server, capsys):
    fake_server.key = "another key"
    assert main(["models", "--url", fake_server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("no     -")
    assert out[-1] == f"SERVED: the server at {fake_server.url} did not list its models (HTTP 401)"

    fake_server.shutdown()
    fake_server.server_close()
    assert main(["models", "--url", fake_server.url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"SERVED: no server at {fake_server.url}"


def test_the_admin_key_goes_only_to_a_server_on_this_machine(home, monkeypatch):
    import urllib.request

    from tokenmill.cli import served_models

    (home / "admin.key").write_text("sk-tm-admin\n")
    sent = []

    def urlopen(request, timeout):  # records what would be sent; nothing leaves the machine
        sent.append((request.full_url, request.get_header("Authorization")))
        raise OSError("not connecting")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    for url in ("http://127.0.0.1:8000", "http://localhost:9", "http://models.example:8000"):
        assert served_models(url) == (url, None, f"no server at {url}")
    assert sent == [("http://127.0.0.1:8000/v1/models", "Bearer sk-tm-admin"),
                    ("http://localhost:9/v1/models", "Bearer sk-tm-admin"),
                    ("http://models.example:8000/v1/models", None)]


@pytest.mark.parametrize("catalog_context, asked, served", [
    (131072, None, 131072), (131072, 4096, 4096), (8192, 65536, 8192), (0, None, None),
    (0, 512, 512)])
def test_the_served_context_is_what_was_asked_never_more_than_the_catalog_sells(
        catalog_context, asked, served):
    from tokenmill.cli import served_context

    assert served_context(catalog_context, asked) == served
