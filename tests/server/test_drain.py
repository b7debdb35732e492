"""SIGTERM drain past its timeout, in process: uvicorn + the real app + the scripted engine.

The live-server test covers the in-time case (in-flight requests finish); this one covers the
other half: what is still running when the drain timeout ends is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import uvicorn

from server_fakes import FakeEngine, served
from server_live import free_port
from tokenmill.cli import DrainingServer
from tokenmill.server.app import build_app
from tokenmill.server.state import ServerSettings


async def test_drain_timeout_aborts_what_is_left():
    engine = FakeEngine(delay=0.2)  # 20 characters: ~4 s per request, longer than the drain
    app = build_app([served(engine, "m")], ServerSettings(keys=None))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=0.5)
    server = DrainingServer(config, app)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            server.handle_exit(signal.SIGTERM, None)
            server._captured_signals.clear()  # or uvicorn re-raises SIGTERM at pytest on exit
            assert app.state.server_state.draining
            rest = []
            try:
                async for line in lines:
                    rest.append(line)
            except httpx.RemoteProtocolError:  # the server cut the stream mid-response
                pass
    await asyncio.wait_for(serving, 10)
    # The stream was cut short (no [DONE]) and the engine request was aborted, not leaked.
    assert "data: [DONE]" not in rest
    assert len(engine.aborted) == 1 and not engine.running
