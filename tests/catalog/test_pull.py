"""`tokenmill pull` against a local Hub: a loopback HTTP server speaking the endpoints that
huggingface_hub uses for model_info, snapshot_download and hf_hub_download, over files in memory.
No hub is reachable from the tests; HF_ENDPOINT points at this one."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tokenmill.catalog.catalog import CatalogError, load_catalog
from tokenmill.catalog.checkpoint_info import checkpoint_info
from tokenmill.catalog.pull import PullError, pull
from tokenmill.cli import main

# Files of a real repo that serving does not read: they must not be downloaded.
NOT_SERVED = {"README.md": b"# tiny\n", "original/params.json": b"{}",
              "consolidated.safetensors": b"not these weights", "pytorch_model.bin": b"pickle"}


class LocalHub(ThreadingHTTPServer):
    """repo id -> {path in repo: bytes}, each repo at one commit; `broken` paths answer 500."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.broken: set[str] = set()
        self.downloads: list[str] = []  # "repo/path" of every GET of a file
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = files

    def commit(self, repo: str) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.repos[repo]):
            digest.update(name.encode() + _git_oid(self.repos[repo][name]).encode())
        return digest.hexdigest()


def _git_oid(data: bytes) -> str:
    """The git blob id the Hub gives a (non-LFS) file as its ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHub

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            repo = m[1]
            if repo not in self.server.repos:
                return self._send(404, b'{"error": "Repository not found"}', body,
                                  {"X-Error-Code": "RepoNotFound"})
            info = {"id": repo, "sha": self.server.commit(repo),
                    "siblings": [{"rfilename": f} for f in sorted(self.server.repos[repo])]}
            return self._send(200, json.dumps(info).encode(), body)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path):
            files = self.server.repos[m[1]]
            tree = [{"type": "file", "path": f, "size": len(data), "oid": _git_oid(data)}
                    for f, data in sorted(files.items())]
            return self._send(200, json.dumps(tree).encode(), body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, name = m[1], m[3]
            files = self.server.repos.get(repo, {})
            if name not in files:
                return self._send(404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
            if body and name in self.server.broken:
                return self._send(500, b"Internal Error", body)
            if body:
                self.server.downloads.append(f"{repo}/{name}")
            headers = {"X-Repo-Commit": self.server.commit(repo),
                       "ETag": f'"{_git_oid(files[name])}"', "Accept-Ranges": "bytes"}
            return self._send(200, files[name], body, headers,
                              content_type="application/octet-stream")
        self._send(404, b"not a Hub endpoint", body)

    def _send(self, status: int, data: bytes, body: bool, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def hub(monkeypatch):
    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _tiny_gguf(path: Path) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("output.weight", np.ones((2, 5), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _catalog_file(path: Path, source: dict) -> Path:
    entry = {"id": "test/tiny", "name": "Tiny", "summary": "s", "card": "c", "family": "llama",
             "template": "chatml", "context_length": 512,
             "price": {"input": "0.1", "output": "0.2"}, "source": source, "hardware": "any"}
    path.write_text(json.dumps({"models": [entry]}))  # JSON is YAML
    return path


def test_pull_checkpoint_downloads_the_served_files_byte_for_byte_and_the_catalog_resolves_them(
        tiny_checkpoint, hub, home, tmp_path):
    source = _files(tiny_checkpoint("llama"))
    hub.add("local/tiny-llama", source | NOT_SERVED)
    catalog = load_catalog(_catalog_file(tmp_path / "c.yaml", {"repo": "local/tiny-llama"}))
    with pytest.raises(CatalogError, match=r"test/tiny is not downloaded: run `tokenmill pull "
                                           r"test/tiny`"):
        catalog.resolve("test/tiny")

    path = pull("test/tiny", catalog)

    assert path == home / "models" / "local" / "tiny-llama"
    assert _files(path) == source  # every served file, byte for byte; nothing else
    assert sorted(hub.downloads) == sorted(f"local/tiny-llama/{f}" for f in source)
    assert not (home / "models" / ".partial").exists()
    resolved = catalog.resolve("test/tiny")
    assert (resolved.id, resolved.path, resolved.entry.price.input) == ("test/tiny", path, 100_000)
    assert pull("test/tiny", catalog) == path  # already complete: nothing fetched again
    assert len(hub.downloads) == len(source)


def test_pull_one_gguf_file_of_a_repo(hub, home, tmp_path):
    data = _tiny_gguf(tmp_path / "tiny.gguf")
    hub.add("local/tiny-gguf", {"tiny.Q8_0.gguf": data, "tiny.F32.gguf": b"GGUF other",
                                "README.md": b"# tiny"})
    source = {"repo": "local/tiny-gguf", "gguf_file": "tiny.Q8_0.gguf"}
    catalog = load_catalog(_catalog_file(tmp_path / "c.yaml", source))

    path = pull("test/tiny", catalog)

    assert path == home / "models" / "local" / "tiny-gguf" / "tiny.Q8_0.gguf"
    assert _files(path.parent) == {"tiny.Q8_0.gguf": data}
    assert hub.downloads == ["local/tiny-gguf/tiny.Q8_0.gguf"]
    assert catalog.resolve("test/tiny").path == path
    assert checkpoint_info(path).num_parameters == 3 * 4 + 2 * 5


def test_pull_a_repo_id_not_in_the_catalog_then_serve_it_by_that_id(tiny_checkpoint, hub, home):
    hub.add("someone/tiny-qwen", _files(tiny_checkpoint("qwen2")))
    catalog = load_catalog()

    path = pull("someone/tiny-qwen", catalog)

    resolved = catalog.resolve("someone/tiny-qwen")
    assert (resolved.id, resolved.path) == ("someone/tiny-qwen", path)
    assert (resolved.entry.family, resolved.entry.price.input, resolved.entry.template) == \
        ("qwen2", 0, None)


def test_an_interrupted_pull_is_never_taken_for_a_complete_model_and_resumes(
        tiny_checkpoint, hub, home, tmp_path):
    source = _files(tiny_checkpoint("llama"))
    hub.add("local/tiny-llama", source)
    hub.broken = {"model.safetensors"}
    catalog = load_catalog(_catalog_file(tmp_path / "c.yaml", {"repo": "local/tiny-llama"}))

    with pytest.raises(PullError, match=r"^the Hub answered for local/tiny-llama: .*500"):
        pull("test/tiny", catalog)
    assert not catalog.is_present(catalog.get("test/tiny"))
    with pytest.raises(CatalogError, match="is not downloaded"):
        catalog.resolve("test/tiny")

    hub.broken = set()
    path = pull("test/tiny", catalog)
    assert _files(path) == source


def test_offline_pull_is_one_clear_line_naming_the_hub_and_local_serving(hub, home, capsys,
                                                                        monkeypatch):
    hub.shutdown()
    hub.server_close()  # nothing listens on the port any more
    main(["models"])  # the catalog loads without a hub
    capsys.readouterr()

    assert main(["pull", "meta-llama/llama-3.3-70b-instruct"]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"tokenmill pull: cannot reach the Hugging Face Hub at {hub.url} (")
    assert err[0].endswith("or serve files already on this machine: `tokenmill serve --model "
                           "/path/to/checkpoint-dir` or `--model /path/to/model.gguf`")
    assert not (home / "models" / "meta-llama").exists()


def test_pull_errors_name_what_is_wrong(tiny_checkpoint, hub, home, tmp_path):
    hub.add("local/ggufs", {"a.Q4_K_M.gguf": b"GGUF", "b.Q8_0.gguf": b"GGUF"})
    catalog = load_catalog()
    with pytest.raises(PullError, match=rf"^no repository local/missing on {hub.url} "):
        pull("local/missing", catalog)
    with pytest.raises(PullError, match=r"^local/ggufs is not a Hugging Face checkpoint \(no "
                                        r"config.json\); pick one GGUF file with --gguf-file "
                                        r"\(a.Q4_K_M.gguf, b.Q8_0.gguf\)$"):
        pull("local/ggufs", catalog)
    with pytest.raises(PullError, match=r"^local/ggufs has no file c.gguf; its GGUF files: "
                                        r"a.Q4_K_M.gguf, b.Q8_0.gguf$"):
        pull("local/ggufs", catalog, gguf_file="c.gguf")
    with pytest.raises(PullError, match=r"is neither a catalog id .* nor a Hugging Face repo id"):
        pull("not a repo", catalog)
    local = load_catalog(_catalog_file(tmp_path / "c.yaml", {"path": "/somewhere/model.gguf"}))
    with pytest.raises(PullError, match=r"^test/tiny is a local model at /somewhere/model.gguf: "
                                        r"there is nothing to pull$"):
        pull("test/tiny", local)
    assert hub.downloads == []


def test_pull_the_pypi_sourced_default_uses_the_file_already_fetched(home, hub):
    present = home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    present.parent.mkdir(parents=True)
    present.write_bytes(b"GGUF")
    assert pull("SmolLM2-135M-Instruct", load_catalog()) == present  # pip is not run
    assert hub.downloads == []
