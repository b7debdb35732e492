"""Bearer auth on /v1: the presented key, hashed, looked up in the platform store on every
request (no cache: a key revoked or expired is refused on its next request).

Keys are stored only as SHA-256 hashes (tokenmill/platform/keys.py); the key itself is shown once
and never logged. The lookup is a database query, so it runs in a worker thread, never on the
event loop. A store that cannot be reached refuses the request with a 503 (fail closed), logged
once, not per request; with `--ledger-fail-open`, keys seen before the outage keep working.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from tokenmill.platform.keys import KeyService, Principal, display_key, hash_key
from tokenmill.platform.store import StoreUnavailable
from tokenmill.server.errors import invalid_api_key
from tokenmill.server.store_outage import StoreOutage

log = logging.getLogger(__name__)

ADMIN_NAME = "admin"


def ensure_admin_key(keys: KeyService, home: Path) -> str | None:
    """On first start (no active admin key), create one, write it to `home/admin.key` (0600) and
    return it; the old `keys.json` of earlier versions is imported first, once."""
    keys.import_json(home / "keys.json")
    if keys.has_admin():
        return None
    taken = {info.name for info in keys.list()}
    name = ADMIN_NAME if ADMIN_NAME not in taken else next(
        f"{ADMIN_NAME}-{i}" for i in range(2, len(taken) + 3) if f"{ADMIN_NAME}-{i}" not in taken)
    key, _ = keys.create(name, admin=True)
    home.mkdir(parents=True, exist_ok=True)
    _write_private(home / "admin.key", key + "\n")
    log.info("created admin key %s (%s), saved to %s", name, display_key(key),
             home / "admin.key")
    return key


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


class Authenticator:
    """Resolve an `Authorization: Bearer <key>` header to a principal, or raise a 401 (a 503 when
    the store is unreachable and the key cannot be vouched for: see server/store_outage.py)."""

    def __init__(self, keys: KeyService | None, outage: StoreOutage | None = None):
        self.keys = keys  # None: auth disabled (--no-auth)
        self.outage = outage or StoreOutage(None)

    async def __call__(self, authorization: str | None) -> Principal | None:
        if self.keys is None:
            return None
        if not authorization:
            raise invalid_api_key("You didn't provide an API key. You need to provide your API key "
                                  "in an Authorization header using Bearer auth "
                                  "(i.e. Authorization: Bearer YOUR_KEY).")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise invalid_api_key("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
        try:
            principal = await asyncio.to_thread(self.keys.authenticate, key)
        except StoreUnavailable as exc:
            refusal = self.outage.failed(exc, "key store")
            principal = self.outage.known(hash_key(key)) if self.outage.fail_open else None
            if principal is None or _expired(principal):
                raise refusal from None
            return principal
        self.outage.reachable()
        if principal is None:
            shown = display_key(key) if len(key) > 12 else "***"
            raise invalid_api_key(f"Incorrect API key provided: {shown}.")
        self.outage.remember(hash_key(key), principal)
        return principal


def _expired(principal: Principal) -> bool:
    return principal.expires_at is not None and principal.expires_at <= datetime.now(timezone.utc)
