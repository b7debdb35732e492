"""The usage spool: where usage records wait while the store is down (`--ledger-fail-open`).

A server that fails open keeps serving through a store outage; the records it cannot write go to
this append-only file instead, one JSON object a line, each flushed and fsync'd before the
response's last byte leaves, so a record is as durable in the spool as in the ledger. `replay`
moves them into the ledger once the store is back (the server tries after every record it writes
and at start). `Ledger.record` is idempotent on the response id, so a record replayed twice (a
crash between the ledger write and the spool's truncation) is still one row.

A crash in the middle of an append can leave a torn last line: it belonged to a response whose
last byte never left. `replay` moves any line it cannot read to `<spool>.rejected`, with a
warning, for a person to look at; it never blocks the records after it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from tokenmill.platform.ledger import Ledger, UsageEntry
from tokenmill.platform.store import StoreUnavailable

log = logging.getLogger(__name__)

_TIMES = ("created_at", "finished_at")  # the UsageEntry fields stored as ISO 8601


class UsageSpool:
    """One file of pending records; safe to share between threads (one lock for the file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, entry: UsageEntry) -> None:
        """Add `entry`, durably (fsync'd) before returning."""
        fields = asdict(entry)
        for name in _TIMES:
            fields[name] = fields[name].isoformat()
        line = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def pending(self) -> bool:
        """Whether records wait to be replayed (a cheap stat, no lock)."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def replay(self, ledger: Ledger) -> int:
        """Write the waiting records to `ledger`, oldest first; returns how many were new there.
        Stops at the first `StoreUnavailable` (raised again), keeping the records not yet
        written; the file is emptied only once all of them are in."""
        with self._lock:
            try:
                lines = self.path.read_bytes().splitlines()
            except FileNotFoundError:
                return 0
            written = 0
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                entry = _parse(line)
                if entry is None:
                    self._reject(line)
                    continue
                try:
                    written += ledger.record(entry)
                except StoreUnavailable:
                    self._keep(lines[number:])
                    raise
            self._keep([])
            if lines:
                log.info("replayed %d spooled usage records into the ledger (%d new)", len(lines),
                         written)
            return written

    def _reject(self, line: bytes) -> None:
        rejected = self.path.with_name(self.path.name + ".rejected")
        with open(rejected, "ab") as f:
            f.write(line + b"\n")
        log.warning("a usage spool line could not be read (torn by a crash?); moved to %s",
                    rejected)

    def _keep(self, lines: list[bytes]) -> None:
        """Replace the file by `lines`, atomically (a crash leaves the old or the new file)."""
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(line + b"\n" for line in lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)


def _parse(line: bytes) -> UsageEntry | None:
    """The entry of one line; None if it cannot be read."""
    try:
        fields = json.loads(line)
        for name in _TIMES:
            fields[name] = datetime.fromisoformat(fields[name])
        return UsageEntry(**fields)
    except (ValueError, TypeError, KeyError):
        return None
