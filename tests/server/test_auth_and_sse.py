"""Bearer auth over the platform's keys, admin key creation and SSE framing: no engine, no
app."""

from __future__ import annotations

import json
import stat

import pytest

from tokenmill.sampling_params import SamplingParamsError
from tokenmill.server import sse
from tokenmill.platform.keys import KeyService, display_key, hash_key
from tokenmill.platform.store import open_store
from tokenmill.server.auth import Authenticator, ensure_admin_key
from tokenmill.server.errors import APIError


@pytest.fixture
def keys(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'tokenmill.db'}")
    yield KeyService(store)
    store.close()


def test_admin_key_created_once_hashed_and_private(tmp_path, keys):
    key = ensure_admin_key(keys, tmp_path)
    assert key.startswith("sk-tm-") and len(key) > 40
    key_file = tmp_path / "admin.key"
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key.encode() not in (tmp_path / "tokenmill.db").read_bytes()  # only its hash
    assert [(k.name, k.admin) for k in keys.list()] == [("admin", True)]
    # Second start: nothing new is created or printed.
    assert ensure_admin_key(keys, tmp_path) is None
    assert key_file.read_text().strip() == key


def test_a_revoked_admin_key_is_replaced_under_a_new_name(tmp_path, keys):
    ensure_admin_key(keys, tmp_path)
    keys.revoke("admin")
    key = ensure_admin_key(keys, tmp_path)
    assert keys.authenticate(key).name == "admin-2"
    assert (tmp_path / "admin.key").read_text().strip() == key


def test_keys_json_of_earlier_versions_is_imported_and_its_keys_still_work(tmp_path, keys):
    old_key = "sk-tm-" + "k" * 43
    (tmp_path / "keys.json").write_text(json.dumps([
        {"name": "admin", "key_hash": hash_key(old_key), "display": display_key(old_key),
         "admin": True, "created": 1700000000}]))
    assert ensure_admin_key(keys, tmp_path) is None  # the imported admin key is the admin key
    assert keys.authenticate(old_key).name == "admin"


@pytest.mark.parametrize("header",
                         [None, "", "Bearer", "Basic abc", "Bearer sk-tm-nope", "sk-tm-x"])
async def test_authenticator_rejects(keys, header):
    keys.create("alice")
    with pytest.raises(APIError) as info:
        await Authenticator(keys)(header)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


async def test_authenticator_accepts_refuses_revoked_and_no_auth(keys):
    key, _ = keys.create("alice")
    assert (await Authenticator(keys)(f"Bearer {key}")).name == "alice"
    assert (await Authenticator(keys)(f"bearer   {key}")).name == "alice"
    keys.revoke("alice")
    with pytest.raises(APIError) as info:
        await Authenticator(keys)(f"Bearer {key}")
    assert info.value.status == 401
    assert await Authenticator(None)(None) is None


async def test_an_unreachable_store_is_a_503_not_a_500(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'tokenmill.db'}")
    keys = KeyService(store)
    key, _ = keys.create("alice")
    (tmp_path / "tokenmill.db").unlink()
    (tmp_path / "tokenmill.db").mkdir()  # the file is gone and cannot come back: unreachable
    store.close()
    with pytest.raises(APIError) as info:
        await Authenticator(keys)(f"Bearer {key}")
    assert (info.value.status, info.value.code) == (503, "store_unavailable")


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
