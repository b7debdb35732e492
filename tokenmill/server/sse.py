"""Server-sent events framing for OpenAI streams.

Every event is `data: <json>` and a blank line; the stream ends with `data: [DONE]`. An error
raised after the 200 went out cannot change the status: it becomes `data: {"error": ...}`, then
`data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel

from tokenmill.engine.async_llm import EngineDeadError
from tokenmill.engine.llm_engine import PromptError
from tokenmill.server.errors import INVALID_REQUEST, SERVER_ERROR, APIError, error_body

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


async def with_error_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass `chunks` through; an exception becomes an error event, and `[DONE]` always ends it."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield event(exc.body())
    except PromptError as exc:
        yield event(error_body(str(exc), INVALID_REQUEST, None, "invalid_value"))
    except EngineDeadError:
        yield event(error_body("The inference engine stopped.", SERVER_ERROR, None,
                               "engine_unavailable"))
    except Exception:
        log.exception("error while streaming")
        yield event(error_body("The server had an error while processing your request.",
                               SERVER_ERROR, None, "internal_error"))
    yield DONE
