"""Server-sent events framing for OpenAI streams.

Every event is `data: <json>` and a blank line; the stream ends with `data: [DONE]`. An error
raised after the 200 went out cannot change the status: it becomes `data: {"error": ...}`, then
`data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from tokenmill.server.errors import APIError, to_api_error

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
# No caching, and no buffering by nginx-style proxies: tokens must reach the client as they come.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
MEDIA_TYPE = "text/event-stream"


def event(payload: BaseModel | dict, exclude: set[str] | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + data.encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """An SSE response that closes its body generator, then runs `on_close`, however it ends.

    Order matters: when the client leaves while a `send` is blocked, Starlette cancels the
    response outside the generator, which is left suspended at a `yield`. Closing it here runs
    its own exit path (which bills what was produced) before `on_close`, deterministically, not
    whenever the garbage collector gets to it; `on_close` also covers a client that left before
    the generator started (then the generator's own `finally` never runs)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(with_error_events(chunks), media_type=MEDIA_TYPE, headers=HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                await self.on_close()


async def with_error_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass `chunks` through; an exception becomes an error event, and `[DONE]` always ends it.
    Closing this generator closes `chunks`."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        err = to_api_error(exc)
        if err.code == "internal_error" and not isinstance(exc, APIError):
            log.exception("error while streaming")
        yield event(err.body())
    finally:
        await chunks.aclose()
    yield DONE
