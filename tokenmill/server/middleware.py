"""The ASGI guard in front of every route: one log line per request, Bearer auth on /v1,
503 while draining, and the request-body limit (413), all before the body is parsed; on the way
out, the caller's x-ratelimit-* headers, an x-request-id and the headers that keep browsers from
guessing content types or leaking URLs (nosniff, no referrer) on every response, and the one 500
for any error no route handled.
"""

from __future__ import annotations

import asyncio

import logging
import time
import uuid

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from tokenmill.server.auth import Authenticator
from tokenmill.server.errors import APIError, internal_error, too_large, unavailable
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.http")
SAFE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))


class GuardMiddleware:
    def __init__(self, app, authenticator: Authenticator, state: ServerState):
        self.app = app
        self.authenticate = authenticator
        self.state = state
        self.max_body = state.settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = 0
        request_id = f"req_{uuid.uuid4().hex}"  # in the x-request-id header and a 500's body
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = await self._with_rate_headers(scope, message)
                message["headers"] = [*message.get("headers", ()),
                                      (b"x-request-id", request_id.encode()), *SAFE_HEADERS]
            await send(message)

        try:
            error = await self._check(scope)
            if error is not None:
                await error.response()(scope, receive, send_logged)
            else:
                await self.app(scope, self._limited(receive), send_logged)
        except Exception:
            # Any error no route handled: its traceback logged once, here, with the request id,
            # and a 500 that says nothing of it (if the response had not started yet).
            log.exception("unhandled error on %s %s (request id %s)", scope["method"],
                          scope["path"], request_id)
            if not status:
                await internal_error(request_id).response()(scope, receive, send_logged)
        finally:
            # Path only: never the query string, body, or any header (keys live there).
            log.info("%s %s %s %.0fms %s", scope["method"], scope["path"], status or "-",
                     (time.monotonic() - start) * 1000, request_id)

    async def _check(self, scope) -> APIError | None:
        headers = Headers(scope=scope)
        path = scope["path"]
        if path in ("/v1", "/admin") or path.startswith(("/v1/", "/admin/")):
            try:
                principal = await self.authenticate(headers.get("authorization"))
            except APIError as exc:
                return exc
            scope.setdefault("state", {})["principal"] = principal
            if self.state.draining:
                return unavailable("The server is shutting down.", "server_draining")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return too_large(self.max_body)
        return None

    async def _with_rate_headers(self, scope, start: dict) -> dict:
        """OpenAI's x-ratelimit-* headers on every response to a key with limits, unless the
        route set its own (a generation request's, taken at its admission)."""
        principal = scope.get("state", {}).get("principal")
        if principal is None or any(name.startswith(b"x-ratelimit-")
                                    for name, _ in start.get("headers", ())):
            return start
        rate = await asyncio.to_thread(self.state.limiter.headers, principal.key_id,
                                       principal.limits)  # a Redis round trip off the loop
        if not rate:
            return start
        extra = [(name.encode(), value.encode()) for name, value in rate.items()]
        return {**start, "headers": [*start.get("headers", ()), *extra]}

    def _limited(self, receive):
        """Count body bytes as they arrive (chunked uploads carry no Content-Length)."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    # FastAPI re-raises HTTPException from body reading; the handler makes it a 413.
                    raise HTTPException(413, too_large(self.max_body).message)
            return message

        return wrapped

