"""`tokenmill serve` as one Ray Serve application: an ingress deployment in front of one engine
deployment per model.

    HTTP -> Ray Serve's proxy -> ingress (M replicas: the FastAPI app, auth, limits, ledger, web)
                                  -> engine-<i> (N replicas each: EngineReplica, prefix-routed)

One builder, two ways to run it:
- `tokenmill serve --ingress-replicas M [--replicas N ...]` (`serve_application`): this process
  starts a local Ray (or joins `--ray-address`), runs the application with the proxy on
  --host/--port, and deletes it on SIGTERM/SIGINT, the replicas draining.
- `serve run deploy/ray-serve.yaml`, or `serve deploy` to a running cluster: the config names
  `build_application`, whose `args.flags` are `tokenmill serve`'s own flags.

The flags are parsed by the CLI's parser and resolved by its helpers, so both forms accept
exactly what `tokenmill serve` does. The builder resolves the models and sets the platform up
once (store and Redis reachable, the first admin key created and printed); each ingress replica
then opens its own connections. Ingress replicas share limits and ledger only through Redis and
PostgreSQL: M > 1 needs --redis (which needs PostgreSQL), and --ledger-fail-open is refused (a
spool file is one process's). Every node must see the model files at the paths the builder
resolved (the same $TOKENMILL_HOME layout), as each ingress replica reads the tokenizer and each
engine replica the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
import sys
import threading
from dataclasses import dataclass

from pydantic import BaseModel
from ray import serve

from tokenmill.catalog.catalog import CatalogEntry, load_catalog
from tokenmill.cli import (FAILURE_OPTIONS, UsageError, build_parser, engine_config, fingerprint,
                           given_options, kv_shares, open_platform, replica_plan, resolve_specs)
from tokenmill.models.default import DEFAULT_MODEL_ID
from tokenmill.models.loader import open_model
from tokenmill.scaleout.cluster import (INGRESS_CPUS, DeploymentFailedError, ReplicaPlan,
                                        engine_deployment, run_application, start_cluster,
                                        stop_cluster)
from tokenmill.scaleout.remote_engine import RemoteEngine

log = logging.getLogger(__name__)

APP_NAME = "tokenmill"


class ApplicationArgs(BaseModel):
    """The `args` of a Ray Serve config naming `build_application`."""

    flags: str | list[str] = []  # `tokenmill serve`'s flags: one string (shell-split) or a list


@dataclass(frozen=True)
class IngressModel:
    """What an ingress replica needs of one served model besides its engine deployment."""

    id: str
    entry: CatalogEntry
    fingerprint: str
    path: str  # where the tokenizer and config are read (no weights)
    max_model_len: int | None


def parse_flags(flags: str | list[str]) -> argparse.Namespace:
    """`tokenmill serve`'s flags, parsed as the CLI parses them."""
    return build_parser().parse_args(["serve", *(shlex.split(flags) if isinstance(flags, str)
                                                 else flags)])


def build_application(args: dict):
    """The application builder of `serve run` / `serve deploy` configs."""
    options = parse_flags(ApplicationArgs.model_validate(args).flags)
    if options.ingress_replicas is None:
        options.ingress_replicas = 1
    try:
        app, _, _ = application(options)
    except UsageError as exc:
        raise ValueError(f"tokenmill: {exc}") from None
    return app


def application(args: argparse.Namespace) -> tuple[object, ReplicaPlan, int]:
    """The bound application of the parsed serve flags `args`, its engines' replica plan and
    how many models (engine deployments) it has; UsageError for flags it cannot serve, or a
    store or Redis out of reach."""
    check_ingress(args)
    catalog = load_catalog(args.catalog)
    resolved = resolve_specs(catalog, args.model or [DEFAULT_MODEL_ID])
    shares = kv_shares(len(resolved), args.kv_cache_gib)
    if (args.replicas, args.min_replicas, args.max_replicas) == (None, None, None):
        args.replicas = 1
    plan = replica_plan(args)
    settings = open_platform(args)  # once, before any replica: reachability, the admin key
    models, engines = [], []
    for i, (model, share) in enumerate(zip(resolved, shares)):
        config = engine_config(model, share, args)
        models.append(IngressModel(model.id, model.entry, fingerprint(model.path, config.dtype),
                                   config.model, config.max_model_len))
        engines.append(engine_deployment(config, plan, given_options(args, FAILURE_OPTIONS),
                                         name=f"engine-{i}"))
    # Each replica takes every request the app would admit, so that the app's own admission
    # (503s past --max-pending-sequences, 429s per key) decides, not Ray Serve's default of 5
    # ongoing requests, past which its proxy queues requests unseen.
    ingress = serve.deployment(Ingress, name="ingress").options(
        num_replicas=args.ingress_replicas, ray_actor_options={"num_cpus": INGRESS_CPUS},
        max_ongoing_requests=settings.max_pending_sequences,
        graceful_shutdown_timeout_s=settings.drain_timeout_s, health_check_period_s=5)
    return ingress.bind(args, models, engines), plan, len(models)


def check_ingress(args: argparse.Namespace) -> None:
    """What several ingress processes cannot do alone."""
    if args.ingress_replicas < 1:
        raise UsageError(f"--ingress-replicas must be at least 1, not {args.ingress_replicas}")
    if args.ingress_replicas > 1 and args.redis is None and not args.no_auth:
        raise UsageError("--ingress-replicas above 1 needs --redis: each replica would otherwise "
                         "keep its own rate limits and budgets, letting a key through M times")
    if args.ledger_fail_open:
        raise UsageError("--ledger-fail-open spools usage to one process's file; with "
                         "--ingress-replicas the ledger fails closed (a 503 while the store is "
                         "out of reach)")


@serve.ingress()
class Ingress:
    """One ingress replica: `tokenmill serve`'s FastAPI app over RemoteEngines of the engine
    deployments (their handles, from the bound `engines`, in the order of `models`). `args`:
    the parsed serve flags, as the builder resolved them."""

    async def __init__(self, args: argparse.Namespace, models: list[IngressModel],
                       engines: list):
        from tokenmill.server.app import build_app
        from tokenmill.server.models import ServedModel
        from tokenmill.web import mount_web

        settings = await asyncio.to_thread(open_platform, args, False)
        served = []
        for model, handle in zip(models, engines):
            described = await handle.describe.remote()
            opened = await asyncio.to_thread(open_model, model.path, model.max_model_len)
            engine = RemoteEngine(handle, described, opened.tokenizer, opened.config)
            served.append(ServedModel(id=model.id, engine=engine, entry=model.entry,
                                      fingerprint=model.fingerprint))
        self._app = build_app(served, settings)
        mount_web(self._app, load_catalog(args.catalog))

    def __serve_build_asgi_app__(self):
        return self._app


def serve_application(args: argparse.Namespace) -> int:
    """`tokenmill serve --ingress-replicas M`: run the application until SIGTERM or SIGINT, then
    delete it (Ray Serve drains every replica). 2 for flags it cannot serve or replicas that
    cannot start."""
    try:
        app, plan, models = application(args)
    except UsageError as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 2
    try:
        start_cluster(args.ray_address, plan, models, http=(args.host, args.port),
                      ingress_replicas=args.ingress_replicas)
    except DeploymentFailedError as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 2
    local = args.ray_address is None
    try:
        log.info("starting the %s application: %d ingress replicas", APP_NAME,
                 args.ingress_replicas)
        run_application(app, APP_NAME, route_prefix="/")
    except DeploymentFailedError as exc:
        stop_cluster([], local)
        print(f"tokenmill serve: the application did not start: {exc}", file=sys.stderr)
        return 2
    log.info("serving on http://%s:%d/v1", args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stop.set())
    stop.wait()
    log.info("stopping: the replicas drain")
    stop_cluster([APP_NAME], local)
    return 0
