"""The `tokenmill` command: `serve` (`keys` arrives with the platform issue)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
from pathlib import Path

import uvicorn

from tokenmill import __version__

log = logging.getLogger("tokenmill")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models behind an OpenAI-compatible API")
    serve.add_argument("--model", action="append", metavar="SPEC",
                       help="a GGUF file or a Hugging Face checkpoint directory (default: the "
                            "bundled SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    # Engine and server options default to their config dataclasses' fields: an option left
    # out is absent from `args` (SUPPRESS) and the dataclass default applies.
    opt = dict(default=argparse.SUPPRESS)
    serve.add_argument("--dtype", help="auto, float32, bfloat16 or float16", **opt)
    serve.add_argument("--device", help="auto, cpu or cuda", **opt)
    serve.add_argument("--no-auth", action="store_true", help="serve /v1 without API keys")
    serve.add_argument("--kv-cache-gib", type=float, **opt)
    serve.add_argument("--max-model-len", type=int, **opt)
    serve.add_argument("--max-num-seqs", type=int, **opt)
    serve.add_argument("--max-body-bytes", type=int, **opt)
    serve.add_argument("--request-timeout", type=float, dest="request_timeout_s", metavar="SECONDS",
                       help="server-side deadline of one request, seconds", **opt)
    serve.add_argument("--max-pending", type=int, dest="max_pending_requests", metavar="N",
                       help="requests in flight before new ones get a 503", **opt)
    serve.add_argument("--drain-timeout", type=float, dest="drain_timeout_s", metavar="SECONDS",
                       help="on SIGTERM, seconds that in-flight requests get to finish", **opt)
    serve.add_argument("--log-level", default="info")

    args = parser.parse_args(argv)
    return serve_command(args)


ENGINE_OPTIONS = ("dtype", "device", "max_model_len", "kv_cache_gib", "max_num_seqs")
SERVER_OPTIONS = ("max_body_bytes", "request_timeout_s", "max_pending_requests", "drain_timeout_s")


def _given(args, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def model_id_for(path: Path) -> str:
    """The id clients send: DEFAULT_MODEL_ID for the bundled GGUF, else the file stem/dir name."""
    from tokenmill.models.default import DEFAULT_MODEL_ID, MEMBER

    if path.name == Path(MEMBER).name:
        return DEFAULT_MODEL_ID
    return path.stem if path.is_file() else path.name


def serve_command(args) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokenmill.config import EngineConfig
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.models.default import default_model_path, tokenmill_home
    from tokenmill.server.app import build_app
    from tokenmill.server.auth import KeyStore, ensure_admin_key
    from tokenmill.server.pricing import price_for
    from tokenmill.server.state import ServerSettings

    home = tokenmill_home()
    home.mkdir(parents=True, exist_ok=True)
    specs = args.model or []
    if len(specs) > 1:
        log.warning("several --model given; serving only the first (%s) for now", specs[0])
    path = Path(specs[0]).expanduser() if specs else default_model_path()
    if not path.exists():
        log.error("model %s not found (a GGUF file or a checkpoint directory)", path)
        return 2
    model_id = model_id_for(path)

    store = None
    if args.no_auth:
        log.warning("authentication is OFF (--no-auth): anyone who can reach %s:%d can use /v1",
                    args.host, args.port)
    else:
        store = KeyStore(home / "keys.json")
        key = ensure_admin_key(store, home)
        if key is not None:  # the only time the key is shown
            print(f"Created the admin API key (also saved to {home / 'admin.key'}):\n{key}",
                  flush=True)

    log.info("loading %s from %s", model_id, path)
    config = EngineConfig(model=str(path), **_given(args, ENGINE_OPTIONS))
    engine = AsyncLLM.from_config(config)
    digest = hashlib.sha256(f"{__version__}:{path.name}:{config.dtype}".encode()).hexdigest()
    settings = ServerSettings(model_id=model_id, price=price_for(model_id), key_store=store,
                              fingerprint="fp_" + digest[:10], **_given(args, SERVER_OPTIONS))
    app = build_app(engine, settings)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               access_log=False, timeout_graceful_shutdown=settings.drain_timeout_s,
                               timeout_keep_alive=5)
    server = DrainingServer(uv_config, app)
    log.info("serving %s (context %d) on http://%s:%d/v1", model_id, engine.max_model_len,
             args.host, args.port)
    server.run()
    return 0


class DrainingServer(uvicorn.Server):
    """Marks the app as draining the moment SIGTERM/SIGINT arrives: /health and new /v1 requests
    get a 503 while uvicorn lets in-flight ones finish (the drain timeout), then cancels the rest
    (which aborts them in the engine) and runs the lifespan shutdown that stops the engine."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app_state = app.state.server_state

    def handle_exit(self, sig, frame):
        if not self.app_state.draining:
            log.info("received %s: draining for up to %.0fs", signal.Signals(sig).name,
                     self.config.timeout_graceful_shutdown or 0)
        self.app_state.draining = True
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
