"""KeyStore, admin key creation and SSE framing: no engine, no app."""

from __future__ import annotations

import json
import stat

import pytest

from tokenmill.sampling_params import SamplingParamsError
from tokenmill.server import sse
from tokenmill.server.auth import (Authenticator, KeyStore, ensure_admin_key, hash_key)
from tokenmill.server.errors import APIError


def test_admin_key_created_once_hashed_and_private(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key = ensure_admin_key(store, tmp_path)
    assert key.startswith("sk-tm-") and len(key) > 40
    key_file = tmp_path / "admin.key"
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    stored = (tmp_path / "keys.json").read_text()
    assert key not in stored and hash_key(key) in stored
    assert json.loads(stored)[0]["admin"] is True
    # Second start: nothing new is created or printed.
    assert ensure_admin_key(KeyStore(tmp_path / "keys.json"), tmp_path) is None
    assert key_file.read_text().strip() == key


def test_lookup_and_reload_when_file_changes(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    assert store.lookup("sk-tm-anything") is None
    k1 = store.add("alice")
    other_process = KeyStore(tmp_path / "keys.json")
    assert other_process.lookup(k1).name == "alice"
    k2 = store.add("bob")  # written by "another process": picked up on the next lookup
    assert other_process.lookup(k2).name == "bob"
    assert other_process.lookup(k1 + "x") is None


@pytest.mark.parametrize("header",
                         [None, "", "Bearer", "Basic abc", "Bearer sk-tm-nope", "sk-tm-x"])
def test_authenticator_rejects(tmp_path, header):
    store = KeyStore(tmp_path / "keys.json")
    store.add("alice")
    with pytest.raises(APIError) as info:
        Authenticator(store)(header)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_authenticator_accepts_and_no_auth(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key = store.add("alice")
    assert Authenticator(store)(f"Bearer {key}").name == "alice"
    assert Authenticator(store)(f"bearer   {key}").name == "alice"
    assert Authenticator(None)(None) is None


def test_sse_event_framing():
    assert sse.event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse.DONE == b"data: [DONE]\n\n"


async def test_sse_error_after_stream_began():
    async def broken():
        yield sse.event({"n": 1})
        raise APIError(503, "gone", "server_error", None, "aborted")

    frames = [f async for f in sse.with_error_events(broken())]
    assert frames[0] == b'data: {"n":1}\n\n'
    assert json.loads(frames[1][len(b"data: "):]) == {
        "error": {"message": "gone", "type": "server_error", "param": None, "code": "aborted"}}
    assert frames[2] == sse.DONE


async def test_sse_unexpected_error_hides_details():
    async def broken():
        raise RuntimeError("secret internals")
        yield b""

    frames = [f async for f in sse.with_error_events(broken())]
    assert b"secret" not in frames[0] and b"internal_error" in frames[0] and frames[1] == sse.DONE


async def test_sse_error_events_map_like_json_errors():
    async def broken():
        raise SamplingParamsError("seed", "seed out of range")
        yield b""

    frames = [f async for f in sse.with_error_events(broken())]
    assert json.loads(frames[0][len(b"data: "):]) == {"error": {
        "message": "seed out of range", "type": "invalid_request_error", "param": "seed",
        "code": "invalid_value"}}
    assert frames[1] == sse.DONE
