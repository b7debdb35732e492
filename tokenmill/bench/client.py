"""One streamed chat completion against an OpenAI-compatible server, timed as the client sees it:
the first content chunk, every later one, the end of the stream, and the server's usage."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from tokenmill.bench.metrics import RequestResult
from tokenmill.bench.workload import BenchRequest


@dataclass(frozen=True)
class Target:
    name: str  # how the report names it
    url: str  # the API's base URL, ending in /v1
    model: str  # the `model` its requests carry
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def base_url(url: str) -> str:
    """http://host:port or http://host:port/v1 -> http://host:port/v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def resolve_target(client: httpx.AsyncClient, name: str, url: str, model: str | None,
                         api_key: str | None) -> Target:
    """The target at `url`; without `model`, the first model its /v1/models lists."""
    url = base_url(url)
    if model is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        response = await client.get(url + "/models", headers=headers)
        response.raise_for_status()
        listed = response.json().get("data") or []
        if not listed:
            raise ValueError(f"{url}/models lists no model: pass the model id")
        model = listed[0]["id"]
    return Target(name, url, model, api_key)


def request_body(target: Target, request: BenchRequest, temperature: float) -> dict:
    return {"model": target.model, "messages": list(request.messages),
            "max_tokens": request.output_len, "temperature": temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(client: httpx.AsyncClient, target: Target, request: BenchRequest,
                      temperature: float = 0.0) -> RequestResult:
    """Send `request` streamed and time it; a failure is a result with its error, never an
    exception."""
    result = RequestResult()
    usage, finished = None, False
    start = time.perf_counter()
    try:
        async with client.stream("POST", target.url + "/chat/completions",
                                 json=request_body(target, request, temperature),
                                 headers=target.headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_message(body)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"stream error: {_message(json.dumps(chunk))}"
                    return result
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter() - start
                    if result.ttft is None:
                        result.ttft = now
                    result.chunk_times.append(now)
                usage = chunk.get("usage") or usage
    except Exception as exc:  # a network error, or a chunk of an unexpected shape: one failure
        result.error = type(exc).__name__
        return result
    result.latency = time.perf_counter() - start
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens") or 0
        result.output_tokens = usage.get("completion_tokens") or 0
    else:  # a server without include_usage: each content chunk counted as one token
        result.output_tokens = len(result.chunk_times)
    if not finished:
        result.error = "the stream ended without [DONE]"
    elif result.ttft is None:
        result.error = "no content in the stream"
    result.ok = result.error is None
    return result


def _message(body: str) -> str:
    """An OpenAI error body's message, else the body's start."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:200]
        if isinstance(error, str):
            return error[:200]
    except (ValueError, AttributeError):
        pass
    return body[:200]
