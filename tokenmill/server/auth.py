"""API keys: Bearer check against a store that holds only SHA-256 hashes.

Keys are 256-bit random strings with a typed prefix (`sk-tm-`). The store keeps `sha256(key)`,
a display form (`sk-tm-abcd...wxyz`) and the role; the key itself is shown once and never logged.
`KeyStore` is the seam the platform issue replaces with SQLAlchemy: it only needs `add`,
`lookup` and `has_admin`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenmill.server.errors import invalid_api_key

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-tm-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_key(key: str) -> str:
    return f"{key[:len(KEY_PREFIX) + 4]}...{key[-4:]}"


@dataclass(frozen=True)
class Principal:
    name: str  # the key's name, e.g. "admin"
    key_hash: str  # sha256 hex of the key
    display: str  # sk-tm-abcd...wxyz, safe to log
    admin: bool
    created: int  # unix seconds


class KeyStore:
    """A JSON file of hashed keys (`$TOKENMILL_HOME/keys.json`), re-read when it changes on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._keys: list[Principal] = []

    def _load(self) -> list[Principal]:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                self._mtime, self._keys = None, []
                return self._keys
            if mtime != self._mtime:
                data = json.loads(self.path.read_text() or "[]")
                self._keys = [Principal(**row) for row in data]
                self._mtime = mtime
            return self._keys

    def add(self, name: str, admin: bool = False) -> str:
        """Create a key, store its hash, and return the key (the only time it exists in clear)."""
        key = generate_key()
        principal = Principal(name, hash_key(key), display_key(key), admin, int(time.time()))
        keys = [*self._load(), principal]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        _write_private(tmp, json.dumps([asdict(k) for k in keys], indent=1))
        tmp.replace(self.path)
        return key

    def lookup(self, key: str) -> Principal | None:
        """The principal for `key`, comparing hashes in constant time against every stored key."""
        presented = hash_key(key).encode()
        found = None
        for principal in self._load():
            if secrets.compare_digest(presented, principal.key_hash.encode()):
                found = principal
        return found

    def has_admin(self) -> bool:
        return any(k.admin for k in self._load())


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def ensure_admin_key(store: KeyStore, home: Path) -> str | None:
    """On first start, create the admin key, write it to `home/admin.key` (0600) and return it."""
    if store.has_admin():
        return None
    key = store.add("admin", admin=True)
    home.mkdir(parents=True, exist_ok=True)
    _write_private(home / "admin.key", key + "\n")
    log.info("created admin key %s, saved to %s", display_key(key), home / "admin.key")
    return key


class Authenticator:
    """Resolve an `Authorization: Bearer <key>` header to a principal, or raise a 401."""

    def __init__(self, store: KeyStore | None):
        self.store = store  # None: auth disabled (--no-auth)

    def __call__(self, authorization: str | None) -> Principal | None:
        if self.store is None:
            return None
        if not authorization:
            raise invalid_api_key("You didn't provide an API key. You need to provide your API key "
                                  "in an Authorization header using Bearer auth "
                                  "(i.e. Authorization: Bearer YOUR_KEY).")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise invalid_api_key("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
        principal = self.store.lookup(key)
        if principal is None:
            shown = display_key(key) if len(key) > 12 else "***"
            raise invalid_api_key(f"Incorrect API key provided: {shown}.")
        return principal
