"""build_app(models, settings): the FastAPI application, with thin routes.

Routes validate nothing themselves: pydantic (protocol.py) checks the body, the guard middleware
checks auth, draining and body size, and the serving classes do the rest.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer

import tokenmill
from tokenmill.server.admin_api import admin_router
from tokenmill.server.auth import Authenticator
from tokenmill.server.errors import install_error_handlers
from tokenmill.server.metrics import CONTENT_TYPE, Metrics
from tokenmill.server.middleware import GuardMiddleware
from tokenmill.server.models import ServedModel, ServedModels
from tokenmill.server.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                       CompletionRequest, CompletionResponse, ErrorResponse,
                                       ModelCard, ModelList, UsageList)
from tokenmill.server.serving_chat import ChatServing
from tokenmill.server.serving_completion import CompletionServing
from tokenmill.server.state import ServerSettings, ServerState
from tokenmill.server.usage_api import usage_of, usage_summary

log = logging.getLogger(__name__)

# Documents the Bearer scheme in /docs; the check itself is in GuardMiddleware.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_ERRORS = {code: {"model": ErrorResponse}
           for code in (400, 401, 403, 404, 413, 429, 500, 503, 504)}


def build_app(served: list[ServedModel], settings: ServerSettings) -> FastAPI:
    """The app serving every model of `served` (one engine each), routed by `model`."""
    models = ServedModels(served)
    state = ServerState(settings)
    metrics = Metrics()
    chat = ChatServing(models, settings, state, metrics)
    completions = CompletionServing(models, settings, state, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has drained (or cancelled) in-flight requests by now.
        state.draining = True
        for model in models:  # one engine failing to stop must not keep the others running
            try:
                await model.engine.shutdown()
                log.info("engine of %s stopped", model.id)
            except Exception:
                log.exception("engine of %s did not stop cleanly", model.id)

    # No /docs or /redoc: their pages load scripts from a CDN, and every page this server serves
    # works offline (the schema is at /openapi.json).
    app = FastAPI(title="tokenmill", version=tokenmill.__version__,
                  description="OpenAI-compatible inference server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server_state = state
    app.state.metrics = metrics
    app.state.models = models
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, authenticator=Authenticator(settings.keys, state.outage),
                       state=state)

    v1 = APIRouter(prefix="/v1", dependencies=[Security(_bearer)], responses=_ERRORS)

    @v1.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @v1.post("/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create(body, request)

    @v1.get("/usage", response_model=UsageList)
    async def list_usage(request: Request, start: str | None = None, end: str | None = None,
                         model: str | None = None, limit: int = 100, after: str | None = None):
        principal = getattr(request.state, "principal", None)
        return await usage_of(settings.ledger, principal and principal.key_id, start=start,
                              end=end, model=model, limit=limit, after=after)

    @v1.get("/usage/summary")
    async def summarize_usage(request: Request, start: str | None = None, end: str | None = None):
        principal = getattr(request.state, "principal", None)
        if principal is None:  # --no-auth: nothing is recorded (a 400), never every key's usage
            return await usage_summary(None, None, None, start=start, end=end)
        return await usage_summary(settings.keys, settings.ledger, principal.key_id,
                                   start=start, end=end)

    @v1.get("/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[model.card(settings.created) for model in models])

    @v1.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        return models.get(model_id).card(settings.created)

    app.include_router(v1)
    app.include_router(admin_router(settings), dependencies=[Security(_bearer)],
                       responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404)})

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        dead = [model.id for model in models if not model.engine.is_healthy()]
        if dead:
            return JSONResponse({"status": "unhealthy", "models": dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        return Response(metrics.render(models, state.in_flight), media_type=CONTENT_TYPE)

    return app
