"""Async-iterator plumbing between the engine and a route: merge several generations, and stop
(aborting the engine request) as soon as the client hangs up or the deadline passes.

Cancelling the task that awaits an engine generator's `__anext__` raises CancelledError inside
`AsyncLLM.generate`, whose `finally` aborts the request and frees its KV blocks: that is the one
abort path, used for hang-ups, deadlines and shutdown alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from tokenmill.server.errors import SERVER_ERROR, APIError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away; nothing more can be sent."""


async def wait_for_disconnect(raw: Request) -> None:
    """Return when the client disconnects (the body has already been read by then)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel_and_wait(task: asyncio.Future | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task])


def deadline_exceeded(timeout_s: float) -> APIError:
    return APIError(504, f"The request did not finish within {timeout_s:g} s.", SERVER_ERROR,
                    None, "timeout")


async def within(work: Awaitable[T], remaining_s: float, timeout_s: float) -> T:
    """`work`'s result, or a 504 once `remaining_s` of the request's `timeout_s` have passed."""
    try:
        return await asyncio.wait_for(work, max(0.0, remaining_s))
    except TimeoutError:
        raise deadline_exceeded(timeout_s) from None


async def guarded(items: AsyncIterator[T], raw: Request, remaining_s: float,
                  timeout_s: float) -> AsyncIterator[T]:
    """Yield from `items` until it ends; raise ClientDisconnected on a hang-up and a 504
    APIError once `remaining_s` (of the request's `timeout_s`) have passed. `items` is closed
    (so the engine aborts) on every early exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + remaining_s
    disconnect = asyncio.ensure_future(wait_for_disconnect(raw))
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({nxt, disconnect}, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(0.0, deadline - loop.time()))
            if nxt in done:
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                nxt = None
                yield item
            elif disconnect in done:
                raise ClientDisconnected()
            else:
                raise deadline_exceeded(timeout_s)
    finally:
        await _cancel_and_wait(nxt)
        disconnect.cancel()
        await items.aclose()


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Interleave several async iterators, yielding items as they arrive."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield item
        finally:
            await iterators[0].aclose()
        return
    pending: dict[asyncio.Future, AsyncIterator[T]] = {
        asyncio.ensure_future(it.__anext__()): it for it in iterators}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                it = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(it.__anext__())] = it
                yield item
    finally:
        for task in list(pending):
            await _cancel_and_wait(task)
        for it in iterators:
            await it.aclose()
