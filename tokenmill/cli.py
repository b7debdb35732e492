"""The `tokenmill` command: `serve` models behind an OpenAI-compatible API, `pull` a model from
the Hugging Face Hub, list the catalog with `models`, manage API keys with `keys`, check a
running server with `health`, load-test servers with `bench`."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import uvicorn

from tokenmill import __version__
from tokenmill.bench.command import add_bench_parser
from tokenmill.keys_cli import add_keys_parser

log = logging.getLogger("tokenmill")

DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """A command line that cannot be served as given; the message says why."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models behind an OpenAI-compatible API")
    serve.add_argument("--model", action="append", metavar="SPEC",
                       help="a catalog id, a Hugging Face checkpoint directory or a GGUF file; "
                            "repeat it to serve several models (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--catalog", type=Path, metavar="FILE",
                       help="catalog file overriding the shipped catalog (instead of "
                            "$TOKENMILL_HOME/catalog.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--kv-cache-gib", type=float, action="append", metavar="GIB",
                       help="KV cache memory: given once, the total, split evenly across the "
                            "models; or given once per --model, in the same order (default: 1 "
                            "GiB per model)")
    # Engine and server options default to their config dataclasses' fields: an option left
    # out is absent from `args` (SUPPRESS) and the dataclass default applies.
    opt = dict(default=argparse.SUPPRESS)
    serve.add_argument("--dtype", help="auto, float32, bfloat16 or float16", **opt)
    serve.add_argument("--device", help="auto, cpu or cuda", **opt)
    serve.add_argument("--quantization", choices=("auto", "none", "bf16", "int8", "int4"),
                       default="auto",
                       help="how a CPU float32 model's linear weights are stored and run: none "
                            "(float32), bf16, or int8/int4 weight-only (with bfloat16 matmuls "
                            "for prefill-sized batches where measured faster); auto (default): "
                            "a GGUF's 4- or 8-bit weights as int4 or int8, float weights as "
                            "bf16 on CPUs with AMX or AVX-512 BF16, else none; the choice and "
                            "why are in the start-up log")
    serve.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                       action="store_false", default=argparse.SUPPRESS,
                       help="compute every prompt in full, never reusing the KV blocks of an "
                            "earlier one (for measuring what the prefix cache saves)")
    serve.add_argument("--no-auth", action="store_true", help="serve /v1 without API keys")
    serve.add_argument("--db", metavar="URL",
                       help="the platform store (keys, usage): sqlite:///PATH or "
                            "postgresql://... (default: $TOKENMILL_DB, else "
                            "$TOKENMILL_HOME/tokenmill.db)")
    serve.add_argument("--ledger-fail-open", action="store_true",
                       help="while the store is unreachable, serve keys already seen and spool "
                            "usage records to $TOKENMILL_HOME/usage-spool.jsonl (default: refuse "
                            "requests with a 503)")
    serve.add_argument("--redis", metavar="URL",
                       help="keep rate limits and budgets in this Redis (redis://HOST:PORT/DB), "
                            "shared by every server using it, so that several replicas limit "
                            "each key as one would; needs the store on PostgreSQL (default: "
                            "limits per server process)")
    serve.add_argument("--redis-prefix", metavar="PREFIX", default="tokenmill:limits:",
                       help="where in that Redis: deployments sharing one Redis each need their "
                            "own (default: %(default)s)")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="run each model as N engine replicas on Ray Serve, routed by prompt "
                            "prefix, this process staying the ingress (default: one engine in "
                            "this process, no Ray)")
    serve.add_argument("--min-replicas", type=int, metavar="N",
                       help="with --max-replicas: autoscale each model between these bounds")
    serve.add_argument("--max-replicas", type=int, metavar="N")
    serve.add_argument("--target-ongoing-requests", type=float, default=16.0, metavar="N",
                       help="autoscaling's target of ongoing requests per replica "
                            "(default: %(default)s)")
    serve.add_argument("--replica-threads", type=int, metavar="N",
                       help="torch threads of each replica, and the CPUs it reserves in Ray "
                            "(default: the cores divided among the replicas)")
    serve.add_argument("--ray-address", metavar="ADDR",
                       help="put the replicas on this Ray cluster (default: a local one)")
    serve.add_argument("--ingress-replicas", type=int, metavar="M",
                       help="run the API itself (auth, limits, ledger, web) as M replicas of a "
                            "Ray Serve ingress deployment behind Ray Serve's HTTP proxy on "
                            "--host/--port, in front of the engine replicas (default: this "
                            "process is the one ingress); M > 1 needs --redis")
    serve.add_argument("--max-model-len", type=int, **opt)
    serve.add_argument("--tensor-parallel-size", type=int, metavar="K",
                       help="split each model's attention heads and MLP over K processes "
                            "(torch.distributed; K must divide the query and key-value heads): "
                            "on this host, or with --replicas in each replica's Ray placement "
                            "group of K bundles, across nodes if need be; on a CPU each gets "
                            "1/K of the threads (default: 1, one process)", **opt)
    serve.add_argument("--max-num-seqs", type=int, **opt)
    serve.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                       help="token budget of one engine step (decodes + prefill chunks)", **opt)
    serve.add_argument("--max-body-bytes", type=int, **opt)
    serve.add_argument("--request-timeout", type=float, dest="request_timeout_s", metavar="SECONDS",
                       help="server-side deadline of one request, seconds", **opt)
    serve.add_argument("--max-pending-sequences", type=int, metavar="N",
                       help="sequences (prompts x n) in flight before new requests get a 503",
                       **opt)
    serve.add_argument("--max-pending-tokens", type=int, metavar="N",
                       help="their tokens (prompt + max_tokens) before new requests get a 503",
                       **opt)
    serve.add_argument("--max-key-share", type=float, metavar="FRACTION",
                       help="of both, the most one API key may hold (past it: 429)", **opt)
    serve.add_argument("--drain-timeout", type=float, dest="drain_timeout_s", metavar="SECONDS",
                       help="on SIGTERM, seconds that in-flight requests get to finish", **opt)
    serve.add_argument("--max-step-failures", type=int, metavar="N",
                       help="engine steps that may fail (each failing only its own requests) "
                            "within --step-failure-window before the engine is declared dead "
                            "and the server exits with status 3 (default: 3)", **opt)
    serve.add_argument("--step-failure-window", type=float, dest="step_failure_window_s",
                       metavar="SECONDS", help="(default: 60)", **opt)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=serve_command)

    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub into "
                                       "$TOKENMILL_HOME/models")
    pull.add_argument("model", metavar="ID", help="a catalog id or a Hugging Face repo id")
    pull.add_argument("--gguf-file", metavar="FILE",
                      help="download only this GGUF file of the repo")
    pull.add_argument("--revision", help="a branch, tag or commit of the repo (default: main)")
    pull.add_argument("--catalog", type=Path, metavar="FILE", help="catalog file overriding the "
                                                                  "shipped catalog")
    pull.set_defaults(run=pull_command)

    models = sub.add_parser("models", help="list the catalog: prices, hardware, what is "
                                           "downloaded and what a server is serving")
    models.add_argument("--url", default=DEFAULT_URL,
                        help=f"the server whose models to show (default: {DEFAULT_URL})")
    models.add_argument("--catalog", type=Path, metavar="FILE", help="catalog file overriding "
                                                                    "the shipped catalog")
    models.set_defaults(run=models_command)

    health = sub.add_parser("health", help="exit 0 if the server answers /health with 200, "
                                           "else 1 (for container healthchecks)")
    health.add_argument("--url", default=DEFAULT_URL,
                        help=f"the server to check (default: {DEFAULT_URL})")
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    health.set_defaults(run=health_command)

    add_keys_parser(sub)
    add_bench_parser(sub)
    return parser


# ---- serve --------------------------------------------------------------------------------------

ENGINE_OPTIONS = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                  "quantization", "enable_prefix_caching", "tensor_parallel_size")
FAILURE_OPTIONS = ("max_step_failures", "step_failure_window_s")
ENGINE_DEAD_STATUS = 3  # the exit status of a server whose engine was declared dead
SERVER_OPTIONS = ("max_body_bytes", "request_timeout_s", "max_pending_sequences",
                  "max_pending_tokens", "max_key_share", "drain_timeout_s")
DEFAULT_KV_CACHE_GIB = 1.0  # per model, when --kv-cache-gib is not given


def given_options(args, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def resolve_specs(catalog, specs: list[str]) -> list:
    """Every spec as a ResolvedModel; all the errors at once (one per line) in a UsageError,
    duplicates included, before anything is loaded."""
    from tokenmill.catalog.catalog import CatalogError

    resolved, errors = [], []
    for spec in specs:
        try:
            resolved.append(catalog.resolve(spec))
        except CatalogError as exc:
            errors.append(str(exc))
    ids = [model.id for model in resolved]
    twice = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
    if twice:
        errors.append(f"{', '.join(twice)} given more than once: a server serves a model once")
    if errors:
        raise UsageError("\n".join(errors))
    return resolved


def kv_shares(n_models: int, given: list[float] | None) -> list[float]:
    """KV cache GiB of each model: `given` once is a total split evenly, once per model is each
    model's own; none gives each model the default."""
    if not given:
        return [DEFAULT_KV_CACHE_GIB] * n_models
    if any(gib <= 0 for gib in given):
        raise UsageError(f"--kv-cache-gib must be positive, not {min(given)}")
    if len(given) == 1:
        return [given[0] / n_models] * n_models
    if len(given) == n_models:
        return list(given)
    raise UsageError(f"--kv-cache-gib given {len(given)} times for {n_models} models: give it "
                     "once (the total, split evenly) or once per --model, in the same order")


def check_fits(weight_bytes: list[int], shares: list[float], ram_bytes: int) -> None:
    """Refuse models whose weights and KV caches together exceed the machine's memory."""
    kv_bytes = int(sum(shares) * (1 << 30))
    need = sum(weight_bytes) + kv_bytes
    if need > ram_bytes:
        gib = 1 << 30
        raise UsageError(
            f"the models need about {need / gib:.1f} GiB (weights {sum(weight_bytes) / gib:.1f} "
            f"GiB + KV cache {kv_bytes / gib:.1f} GiB) but this machine has {ram_bytes / gib:.1f} "
            "GiB of memory: lower --kv-cache-gib, serve fewer or smaller models, or choose a "
            "smaller --dtype")


def _check_memory(resolved: list, shares: list[float], args) -> None:
    """On CPU, the weights (parameters x the bytes of the dtype each will load in) and the KV
    caches must fit in RAM."""
    from tokenmill.catalog.checkpoint_info import checkpoint_info
    from tokenmill.config import resolve_device, resolve_dtype

    device = resolve_device(getattr(args, "device", "auto"))
    if device.type != "cpu":
        return
    weights = []
    for model in resolved:
        try:
            n = checkpoint_info(model.path).num_parameters
            weights.append(n * resolve_dtype(getattr(args, "dtype", "auto"), device, n).itemsize)
        except ValueError as exc:  # unreadable files, an unknown --dtype
            raise UsageError(str(exc)) from None
    check_fits(weights, shares, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_shared_limits(redis_url: str | None, store_url: str, no_auth: bool) -> None:
    """--redis shares limits between ingress replicas, which then share the ledger too: on
    PostgreSQL, as several machines cannot share one SQLite file."""
    from tokenmill.platform.store import StoreUnavailable, normalise_url

    if redis_url is None:
        return
    if no_auth:
        raise UsageError("--redis limits API keys, and --no-auth serves without any: drop one")
    try:
        backend = normalise_url(store_url).get_backend_name()
    except StoreUnavailable as exc:
        raise UsageError(str(exc)) from None
    if backend != "postgresql":
        raise UsageError("--redis needs the store on PostgreSQL (--db postgresql://... or "
                         "$TOKENMILL_DB), not SQLite: the replicas sharing limits in Redis must "
                         "share one ledger, and several servers cannot share a SQLite file")


def open_platform(args, owner: bool = True):
    """The ServerSettings of the serve flags: keys and ledger on the store (--db), limits in
    this process or in Redis (--redis), the spool (--ledger-fail-open); UsageError when the
    store or Redis cannot be reached. `owner`: this process sets the store up, creating the
    first admin key (printed, the only time it is shown) and replaying what an earlier run
    spooled; the ingress replicas of a Ray Serve application pass False, their application
    builder having done it once."""
    from tokenmill.models.default import tokenmill_home
    from tokenmill.platform.keys import KeyService
    from tokenmill.platform.ledger import Ledger
    from tokenmill.platform.limits import InProcessLimiter, LimiterUnavailable
    from tokenmill.platform.redis_limits import RedisLimiter
    from tokenmill.platform.spool import UsageSpool
    from tokenmill.platform.store import StoreUnavailable, open_store
    from tokenmill.server.auth import ensure_admin_key
    from tokenmill.server.state import ServerSettings

    home = tokenmill_home()
    home.mkdir(parents=True, exist_ok=True)
    keys = ledger = spool = None
    limiter = InProcessLimiter()
    if args.no_auth:
        log.warning("authentication is OFF (--no-auth): anyone who can reach the server can "
                    "use /v1")
    else:
        try:
            if args.redis is not None:  # reached now: LimiterUnavailable, ValueError (bad URL)
                limiter = RedisLimiter.from_url(args.redis, args.redis_prefix)
                log.info("rate limits and budgets in Redis at %s, shared with every server "
                         "using it", limiter.address)
            store = open_store(args.db)
            keys, ledger = KeyService(store), Ledger(store)
            spool = UsageSpool(home / "usage-spool.jsonl")
            key = None
            if owner:
                key = ensure_admin_key(keys, home)
                spool.replay(ledger)  # what an earlier run spooled through an outage
        except (StoreUnavailable, LimiterUnavailable, ValueError) as exc:
            raise UsageError(str(exc)) from None
        if key is not None:  # the only time the key is shown
            print(f"Created the admin API key (also saved to {home / 'admin.key'}):\n{key}",
                  flush=True)
    try:
        return ServerSettings(keys=keys, ledger=ledger,
                              spool=spool if ledger and args.ledger_fail_open else None,
                              limiter=limiter, **given_options(args, SERVER_OPTIONS))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def fingerprint(path: Path, dtype: str) -> str:
    """system_fingerprint: changes when the code, the model file or the dtype does."""
    return "fp_" + hashlib.sha256(f"{__version__}:{path.name}:{dtype}".encode()).hexdigest()[:10]


class EngineDeaths:
    """Engines declared dead (their steps failing again and again). One is enough to end the
    process: it drains (every stream of the dead engine has failed already) and exits non-zero,
    so that a supervisor (deploy/) starts it afresh; it never stays up answering 503."""

    def __init__(self):
        self.models: list[str] = []  # appended on step threads; read after the server stopped
        self.server: DrainingServer | None = None  # set once it exists (before any request)

    def on_dead(self, model_id: str) -> Callable[[BaseException], None]:
        def dead(cause: BaseException) -> None:
            log.critical("the engine of %s is dead (%s): stopping the server, which exits with "
                         "status %d", model_id, type(cause).__name__, ENGINE_DEAD_STATUS)
            self.models.append(model_id)
            if self.server is not None:  # uvicorn's loop sees the flag within 0.1 s and drains
                self.server.app_state.draining = True
                self.server.should_exit = True

        return dead


def replica_plan(args):
    """The ReplicaPlan of --replicas / --min-replicas and --max-replicas; None without them (one
    engine in this process, nothing of Ray imported)."""
    bounds = (args.min_replicas, args.max_replicas)
    if args.replicas is None and bounds == (None, None):
        return None
    if args.replicas is not None and bounds != (None, None):
        raise UsageError("give --replicas N, or --min-replicas and --max-replicas, not both")
    if args.replicas is None and None in bounds:
        raise UsageError("autoscaling needs both --min-replicas and --max-replicas")
    low, high = (args.replicas, args.replicas) if args.replicas is not None else bounds
    threads = args.replica_threads or max(1, (os.cpu_count() or 1) // max(1, high))
    try:
        from tokenmill.scaleout.cluster import ReplicaPlan
    except ImportError as exc:
        raise UsageError(f"--replicas needs Ray Serve ({exc}): pip install 'tokenmill[scale]'") \
            from None

    try:
        return ReplicaPlan(low, high, args.target_ongoing_requests, threads,
                           max_ongoing_requests=getattr(args, "max_num_seqs", None) or 256,
                           ranks=getattr(args, "tensor_parallel_size", 1),
                           gpu_per_rank=getattr(args, "device", "auto") == "cuda")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def engine_config(model, share: float, args):
    """The EngineConfig of one resolved model with its KV share, from the serve flags."""
    from tokenmill.config import EngineConfig

    options = given_options(args, ENGINE_OPTIONS)
    options["max_model_len"] = served_context(model.entry.context_length,
                                              options.get("max_model_len"))
    return EngineConfig(model=str(model.path), kv_cache_gib=share, **options)


def start_replicas(resolved: list, shares: list[float], args, plan) -> list:
    """Each model as an engine deployment on Ray Serve (tokenmill/scaleout), as ServedModels."""
    from tokenmill.scaleout.cluster import (DeploymentFailedError, deploy_engine,
                                            start_cluster, stop_cluster)
    from tokenmill.server.models import ServedModel

    try:
        start_cluster(args.ray_address, plan, len(resolved))
    except DeploymentFailedError as exc:
        raise UsageError(str(exc)) from None
    served = []
    for model, share, app_name in zip(resolved, shares, replica_app_names(resolved)):
        config = engine_config(model, share, args)
        try:
            engine = deploy_engine(app_name, config, plan,
                                   given_options(args, FAILURE_OPTIONS))
        except DeploymentFailedError as exc:
            stop_cluster(replica_app_names(resolved), local=args.ray_address is None)
            raise UsageError(f"cannot serve {model.id} from {model.path}: {exc}") from None
        served.append(ServedModel(id=model.id, engine=engine, entry=model.entry,
                                  fingerprint=fingerprint(model.path, config.dtype)))
    return served


def replica_app_names(resolved: list) -> list[str]:
    """The Ray Serve application of each model's engine replicas, when this process is their
    ingress."""
    return [f"tokenmill-{i}-{model.path.stem}"[:60] for i, model in enumerate(resolved)]


def load_models(resolved: list, shares: list[float], args, deaths: EngineDeaths) -> list:
    """One engine per model (each with its own step thread and KV cache), as ServedModels."""
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.server.models import ServedModel

    served = []
    for model, share in zip(resolved, shares):
        config = engine_config(model, share, args)
        try:
            engine = AsyncLLM.from_config(config, on_dead=deaths.on_dead(model.id),
                                          **given_options(args, FAILURE_OPTIONS))
            served.append(ServedModel(id=model.id, engine=engine, entry=model.entry,
                                      fingerprint=fingerprint(model.path, config.dtype)))
        except (ValueError, NotImplementedError, OSError) as exc:
            # a configuration or architecture the engine cannot take, unreadable files, a chat
            # template that does not compile; the engines already built run on daemon threads
            raise UsageError(f"cannot serve {model.id} from {model.path}: {exc}") from None
        log.info("loaded %s from %s (context %d, KV cache %.2f GiB)", model.id, model.path,
                 engine.max_model_len, share)
    return served


def served_context(catalog_context: int, asked: int | None) -> int | None:
    """The context to serve: what was asked (--max-model-len), never more than the catalog sells;
    None leaves it to the model's own. The engine also caps it at the model's positions."""
    limits = [n for n in (catalog_context, asked) if n]
    return min(limits) if limits else None


def serve_command(args) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokenmill.catalog.catalog import CatalogError, load_catalog
    from tokenmill.models.default import DEFAULT_MODEL_ID
    from tokenmill.platform.store import default_url
    from tokenmill.server.app import build_app
    from tokenmill.web import mount_web

    try:
        check_shared_limits(args.redis, args.db or default_url(), args.no_auth)
        catalog = load_catalog(args.catalog)
        resolved = resolve_specs(catalog, args.model or [DEFAULT_MODEL_ID])
        shares = kv_shares(len(resolved), args.kv_cache_gib)
        _check_memory(resolved, shares, args)
    except (CatalogError, UsageError) as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 2

    if args.ingress_replicas is not None:  # the whole server as one Ray Serve application
        try:
            from tokenmill.ray_app import serve_application
        except ImportError as exc:
            print(f"tokenmill serve: --ingress-replicas needs Ray Serve ({exc}): pip install "
                  "'tokenmill[scale]'", file=sys.stderr)
            return 2
        return serve_application(args)
    try:
        settings = open_platform(args)
    except UsageError as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 2
    deaths = EngineDeaths()
    try:
        plan = replica_plan(args)
        served = (load_models(resolved, shares, args, deaths) if plan is None else
                  start_replicas(resolved, shares, args, plan))
    except UsageError as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 2
    app = build_app(served, settings)
    mount_web(app, catalog)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               access_log=False, timeout_graceful_shutdown=settings.drain_timeout_s,
                               timeout_keep_alive=5)
    server = deaths.server = DrainingServer(uv_config, app)
    log.info("serving %s on http://%s:%d/v1", ", ".join(m.id for m in served), args.host,
             args.port)
    try:
        server.run()
    finally:
        if plan is not None:
            from tokenmill.scaleout.cluster import stop_cluster

            stop_cluster(replica_app_names(resolved), local=args.ray_address is None)
    return ENGINE_DEAD_STATUS if deaths.models else 0


class DrainingServer(uvicorn.Server):
    """Marks the app as draining the moment SIGTERM/SIGINT arrives: /health and new /v1 requests
    get a 503 while uvicorn lets in-flight ones finish (the drain timeout), then cancels the rest
    (which aborts them in the engine) and runs the lifespan shutdown that stops the engines."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app_state = app.state.server_state

    def handle_exit(self, sig, frame):
        if not self.app_state.draining:
            log.info("received %s: draining for up to %.0fs", signal.Signals(sig).name,
                     self.config.timeout_graceful_shutdown or 0)
        self.app_state.draining = True
        super().handle_exit(sig, frame)


# ---- pull ---------------------------------------------------------------------------------------

def pull_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tokenmill.catalog.catalog import CatalogError, load_catalog
    from tokenmill.catalog.pull import PullError, pull

    try:
        path = pull(args.model, load_catalog(args.catalog), args.gguf_file, args.revision)
    except (CatalogError, PullError) as exc:
        print(f"tokenmill pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


# ---- models -------------------------------------------------------------------------------------

def models_command(args) -> int:
    from tokenmill.catalog.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(args.catalog)
    except CatalogError as exc:
        print(f"tokenmill models: {exc}", file=sys.stderr)
        return 1
    print(format_models(catalog, *served_models(args.url)))
    return 0


def health_command(args) -> int:
    """One line: the server's /health status, or why there was none; 0 only for a 200."""
    url = args.url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            print(f"{url}: {response.status} {response.read().decode(errors='replace')}")
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace')}")
    except OSError as exc:
        print(f"{url}: unreachable ({exc})")
    return 1


def served_models(url: str) -> tuple[str, list[str] | None, str | None]:
    """(url, the ids the server at `url` lists, or None with the reason it could not say)."""
    from tokenmill.models.default import tokenmill_home

    key_file = tokenmill_home() / "admin.key"
    # The admin key goes only to a server on this machine, never to a URL elsewhere.
    local = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
    headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"} \
        if local and key_file.is_file() else {}
    request = urllib.request.Request(url.rstrip("/") + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return url, [model["id"] for model in json.load(response)["data"]], None
    except urllib.error.HTTPError as exc:
        return url, None, f"the server at {url} did not list its models (HTTP {exc.code})"
    except (OSError, ValueError, KeyError, TypeError):
        return url, None, f"no server at {url}"


def format_models(catalog, url: str, served: list[str] | None, problem: str | None) -> str:
    """The catalog as a table (a second line per model: its name and what it needs), then what
    the server serves outside the catalog and the local models the catalog does not list."""
    rows = [("ID", "FAMILY", "CONTEXT", "USD/1M IN", "USD/1M OUT", "LOCAL", "SERVED")]
    notes = []
    for entry in catalog:
        rows.append((entry.id, entry.family, str(entry.context_length), _usd(entry.price.input),
                     _usd(entry.price.output), "yes" if catalog.is_present(entry) else "no",
                     "-" if served is None else "yes" if entry.id in served else "no"))
        cached = "" if entry.price.cached_input is None else \
            f"; cached input USD {_usd(entry.price.cached_input)}/1M"
        notes.append(f"    {entry.name}{cached}; needs {entry.hardware}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i in (2, 3, 4) else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    out = lines[:1] + [line for pair in zip(lines[1:], notes) for line in pair]
    if problem is not None:
        out.append(f"\nSERVED: {problem}")
    else:
        extra = [model_id for model_id in served if catalog.get(model_id) is None]
        if extra:
            out.append(f"\nAlso served at {url} (not in the catalog): {', '.join(extra)}")
    local = _uncatalogued_local_models(catalog)
    if local:
        out.append("\nLocal models not in the catalog (serve one with --model PATH):")
        out += [f"    {path}" for path in local]
    return "\n".join(out)


def _uncatalogued_local_models(catalog) -> list[Path]:
    """Checkpoint directories and GGUF files under $TOKENMILL_HOME/models that no entry names."""
    from tokenmill.catalog.catalog import models_dir

    root = models_dir()
    known = {os.path.realpath(catalog.local_path(entry)) for entry in catalog}
    found = [p.parent for p in root.rglob("config.json")] + list(root.rglob("*.gguf"))
    return sorted(p for p in found if ".partial" not in p.relative_to(root).parts
                  and os.path.realpath(p) not in known)


def _usd(micro: int) -> str:
    """micro-USD as exact decimal USD: 390000 -> "0.39"."""
    return format(Decimal(micro).scaleb(-6).normalize(), "f")


if __name__ == "__main__":
    sys.exit(main())
