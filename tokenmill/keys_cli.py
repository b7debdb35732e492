"""`tokenmill keys`: create, list and revoke API keys, straight in the store (`--db`, else
`$TOKENMILL_DB`, else SQLite in `$TOKENMILL_HOME`), whether or not a server is running: servers
look keys up on every request, so they see a change at once."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from decimal import Decimal

from tokenmill.catalog.pricing import PICO


def add_keys_parser(subparsers) -> argparse.ArgumentParser:
    """Add `keys create|list|revoke` to the `tokenmill` subparsers; runs `keys_command`."""
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_action", required=True)
    db = dict(metavar="URL", help="the store: sqlite:///PATH or postgresql://... (default: "
                                  "$TOKENMILL_DB, else $TOKENMILL_HOME/tokenmill.db)")

    create = actions.add_parser("create", help="create a key and print it (on the last line)")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    create.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    create.add_argument("--budget", metavar="USD", help="spend cap in USD (default: none)")
    create.add_argument("--models", metavar="A,B", help="the only model ids the key may use")
    create.add_argument("--expires", metavar="YYYY-MM-DD",
                        help="the key stops working at 00:00 UTC on this date")
    create.add_argument("--admin", action="store_true", help="the key may use /admin/")
    create.add_argument("--db", **db)

    listing = actions.add_parser("list", help="every key: limits, spend, status, last use")
    listing.add_argument("--db", **db)

    revoke = actions.add_parser("revoke", help="refuse a key from its next request on")
    revoke.add_argument("--name", required=True)
    revoke.add_argument("--db", **db)

    keys.set_defaults(run=keys_command)
    return keys


def keys_command(args) -> int:
    """Run `tokenmill keys ...`; an error is one line on stderr and exit status 2."""
    from tokenmill.platform.keys import KeyService
    from tokenmill.platform.store import StoreUnavailable, open_store

    try:
        store = open_store(args.db)
        try:
            service = KeyService(store)
            if args.keys_action == "create":
                _create(service, args)
            elif args.keys_action == "list":
                _list(service)
            else:
                info = service.revoke(args.name)
                print(f"revoked key {info.name!r} ({info.display})")
        finally:
            store.close()
    except (StoreUnavailable, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)
        print(f"tokenmill keys: error: {message}", file=sys.stderr)
        return 2
    return 0


def _create(service, args) -> None:
    try:
        expires = date.fromisoformat(args.expires) if args.expires else None
    except ValueError:
        raise ValueError(f"--expires must be a date YYYY-MM-DD, not {args.expires!r}") from None
    models = args.models.split(",") if args.models else None
    key, info = service.create(args.name, rpm=args.rpm, tpm=args.tpm, budget_usd=args.budget,
                               models=models, expires=expires, admin=args.admin)
    role = "admin key" if info.admin else "key"
    print(f"created {role} {info.name!r} ({info.display}): rpm {_or_dash(info.rpm)}, "
          f"tpm {_or_dash(info.tpm)}, budget {_usd_or_dash(info.budget_pico)}, "
          f"models {_models(info.models)}, expires "
          f"{info.expires_at.date().isoformat() if info.expires_at else '-'}")
    print("the key is shown only now; store it safely:")
    print(key)


def _list(service) -> None:
    header = ("NAME", "KEY", "RPM", "TPM", "BUDGET USD", "SPEND USD", "MODELS", "STATUS",
              "LAST USED")
    rows = [(info.name + (" (admin)" if info.admin else ""), info.display, _or_dash(info.rpm),
             _or_dash(info.tpm), _usd_or_dash(info.budget_pico), usd(info.spend_pico),
             _models(info.models), info.status,
             info.last_used_at.strftime("%Y-%m-%d %H:%M") if info.last_used_at else "-")
            for info in service.list()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def usd(pico: int) -> str:
    """Picodollars as an exact USD string with at least two decimals: 1500000000000 -> 1.50."""
    text = format((Decimal(pico) / PICO).normalize(), "f")
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"


def _usd_or_dash(pico: int | None) -> str:
    return "-" if pico is None else usd(pico)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _models(models: tuple[str, ...] | None) -> str:
    return "all" if models is None else ",".join(models)
