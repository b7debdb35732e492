"""Schemathesis over every route of a real `tokenmill serve`'s own OpenAPI schema.

The test starts its own server on 127.0.0.1 (the default model, its own tmp $TOKENMILL_HOME so the
admin key is fresh, `--max-model-len 512 --kv-cache-gib 0.25`), loads `/openapi.json` and, per
operation, lets Hypothesis draw schemathesis cases, positive (fitting the schema) and negative (not
fitting it), sent with the admin key (one case in ten keeps schemathesis' own, bogus
`Authorization`, to exercise the 401s). Every response must pass:

- `not_a_server_error`: no 5xx; and a 200 stream must carry no `server_error` event (the 5xx a
  stream cannot send once its 200 went out), and must end with `data: [DONE]`;
- `status_code_conformance`: only status codes the schema documents;
- `content_type_conformance` and `response_schema_conformance`: the documented media type and
  body schema;
- every error body is OpenAI's envelope, exactly `{"error": {"message", "type", "param", "code"}}`.

Failures are collected over the whole run (not stopped at the first) and reported once per kind,
each with the exact request (method, URL, headers, body) and the response. After the run the
engine must be idle again (the `tokenmill_requests_running`/`_waiting` gauges and the KV cache
usage back to 0) and /health 200.

About a minute and a half on a 2-core CPU:

- derandomized (a fixed seed per test, no example database): every run sends the same requests;
- `TOKENMILL_FUZZ_EXAMPLES` (default 300) bounds the examples per operation;
- generations are kept short. Schemathesis draws any integer the schema allows, and a generation
  without `max_tokens` runs up to the context (512 tokens here), so before a case is sent, a
  missing or null `max_tokens` (and chat's `max_completion_tokens`) becomes 8; a value of these
  or of `min_tokens` that the server would accept above 8 (up to the context) becomes 8; and an
  `n` or `best_of` it would accept above 2 becomes 2. What the server refuses (0, negatives,
  beyond the context or MAX_N, wrong types) is sent as drawn, so the refusals are fuzzed too;
- the `model` of a generation body (and the id of `GET /v1/models/{model_id}`) is replaced by the
  served model's id in four cases in five, else nearly every case would be a 404;
- `PATCH`/`DELETE /admin/keys/{name}` never touch the admin key the run authenticates with.

For a release, run it longer (2000 examples per route: about a quarter of an hour here):

    TOKENMILL_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/server/test_fuzz.py

and/or point the schemathesis CLI at a server you started (`tokenmill serve --max-model-len 512`)
with the same checks. The CLI neither shortens generations nor swaps in the served model (most
generation cases are 404s; the few that generate may run to the context); /admin/keys/{name} is
left out, as it could revoke or limit the key the run authenticates with:

    st run http://127.0.0.1:8000/openapi.json --max-examples 1000 --seed 1 --request-timeout 300 \\
        -H "Authorization: Bearer $(cat ~/.tokenmill/admin.key)" \\
        --exclude-path-regex '^/admin/keys/' --checks not_a_server_error,\\
status_code_conformance,content_type_conformance,response_schema_conformance
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from server_live import MODEL_ID, start_server, stop_server
from tokenmill.sampling_params import MAX_N  # above it the server refuses: left alone

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TOKENMILL_FUZZ_EXAMPLES", "300"))
MAX_MODEL_LEN = 512
SHORT_MAX_TOKENS = 8
SHORT_N = 2
ADMIN_NAME = "admin"  # the admin key the server creates on first start, which the run uses
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

# Every operation of the schema; test_every_route_is_fuzzed fails when a route is added without
# being listed here.
ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/usage/summary"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("PATCH", "/admin/keys/{name}"),
    ("DELETE", "/admin/keys/{name}"),
    ("GET", "/admin/usage"),
    ("GET", "/admin/usage/summary"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
GENERATION_ROUTES = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
                     "/v1/completions": ("max_tokens",)}
# Where a fuzz run must reach a 200 at least once, or the fuzzing never got past the checks.
MUST_SUCCEED = {route for route in ROUTES if route[0] == "GET" or route[1] in GENERATION_ROUTES}


@pytest.fixture(scope="module")
def fuzz_server(default_model_path, tmp_path_factory):
    """Its own server: the run creates keys and usage records the session's server must not see.
    One OpenMP thread: the fuzz needs no throughput, and a team of two spinning on cores that other
    work keeps busy makes an 8-token request take seconds instead of a fraction of one."""
    home = tmp_path_factory.mktemp("fuzz_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        running = start_server(home, [
            "--model", str(default_model_path), "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-gib", "0.25", "--drain-timeout", "10"])
    assert running.key, "the server did not create an admin key"
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json", timeout=30)
    # Schemathesis reads 20 events of a stream, then hangs up; read every one (a stream here is
    # at most 64 prompts x 2 choices x 8 tokens), so that its end is checked too.
    schema.config.max_stream_events = 100_000
    return schema


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


# ---- shaping a drawn case ---------------------------------------------------------------------


def _shorten(body: dict, fields: tuple[str, ...]) -> dict:
    """A generation body that runs at most SHORT_MAX_TOKENS tokens x SHORT_N choices, when the
    server would accept it at all; what it would refuse stays as drawn."""
    body = dict(body)
    if all(body.get(f) is None for f in fields):
        body[fields[0]] = SHORT_MAX_TOKENS
    for field in (*fields, "min_tokens"):  # min_tokens too, or it would exceed max_tokens
        value = body.get(field)
        if type(value) is int and SHORT_MAX_TOKENS < value <= MAX_MODEL_LEN:
            body[field] = SHORT_MAX_TOKENS
    for field in ("n", "best_of"):
        value = body.get(field)
        if type(value) is int and SHORT_N < value <= MAX_N:
            body[field] = SHORT_N
    return body


# Headers of HTTP's own framing, not of the API: a malformed one (a Content-Length of "C(fwT")
# is refused by the HTTP server (uvicorn's h11) with a plain-text 400 before the app sees the
# request, so fuzzing them tests uvicorn, not tokenmill.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection",
                             "expect", "upgrade", "te", "trailer"})


def shape(case, served_model: bool, authenticate: bool, key: str):
    """The case as it is sent: authenticated (or not), generations short, the model (maybe)
    one that is served."""
    headers = {k: v for k, v in (case.headers or {}).items()
               if k.lower() != "authorization" and k.lower() not in FRAMING_HEADERS}
    if authenticate:
        headers["Authorization"] = f"Bearer {key}"
    elif case.headers and "authorization" in {k.lower() for k in case.headers}:
        headers = dict(case.headers)  # schemathesis' own, never a valid key
    case.headers = headers
    path = case.operation.path
    if path in GENERATION_ROUTES and isinstance(case.body, dict):
        body = _shorten(case.body, GENERATION_ROUTES[path])
        if served_model and isinstance(body.get("model"), str):
            body["model"] = MODEL_ID
        case.body = body
    if path == "/v1/models/{model_id}" and served_model:
        case.path_parameters = {**case.path_parameters, "model_id": MODEL_ID}
    return case


def touches_admin_key(case) -> bool:
    name = (case.path_parameters or {}).get("name")
    return isinstance(name, str) and urllib.parse.unquote(name) == ADMIN_NAME


# ---- checks of our own ------------------------------------------------------------------------


def error_envelope_problem(body) -> str | None:
    """Why `body` is not OpenAI's error envelope, or None."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return "not {'error': {...}}"
    err = body["error"]
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return "error keys are not exactly message, type, param, code"
    if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)):
        return "message or type is not a non-empty string"
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return "param or code is neither a string nor null"
    return None


def own_problems(response) -> list[str]:
    """Problems the schema cannot express: the error envelope, and SSE streams' frames."""
    status = response.status_code
    ctype = ",".join(response.headers.get("content-type", []))  # lower-case keys, list values
    if status >= 400:
        try:
            body = response.json()
        except ValueError:
            return [f"{status} error body is not JSON"]
        problem = error_envelope_problem(body)
        return [f"{status} error body: {problem}"] if problem else []
    if status == 200 and ctype.startswith("text/event-stream"):
        if response.stream_cut_short:
            return ["stream did not end before the client's timeout"]
        text = response.content.decode("utf-8", errors="replace")
        if not text.endswith("data: [DONE]\n\n"):
            return ["stream does not end with data: [DONE]"]
        problems = []
        for frame in text.split("\n\n")[:-2]:
            if not frame.startswith("data: "):
                problems.append(f"stream frame is not data: {frame[:80]!r}")
                continue
            try:
                payload = json.loads(frame[6:])
            except ValueError:
                problems.append(f"stream frame is not JSON: {frame[:80]!r}")
                continue
            if isinstance(payload, dict) and "error" in payload:
                problem = error_envelope_problem(payload)
                if problem:
                    problems.append(f"stream error event: {problem}")
                elif payload["error"]["type"] == "server_error":
                    problems.append("stream error event of type server_error (a 5xx after the "
                                    f"200): {payload['error']['code']}")
        return problems
    return []


def request_text(case, server) -> str:
    """The exact request, to replay it: method, URL with its query, headers beyond the usual ones
    (the run's key shown as $KEY) and the body as sent."""
    kw = case.as_transport_kwargs(base_url=server.base_url)
    url = kw["url"] + ("?" + urllib.parse.urlencode(kw["params"]) if kw.get("params") else "")
    headers = {k: ("Bearer $KEY" if v == f"Bearer {server.key}" else v)
               for k, v in kw.get("headers", {}).items()
               if k not in ("User-Agent", "Accept-Encoding", "Accept", "Connection",
                            "X-Schemathesis-TestCaseId")}
    if "json" in kw:
        body = json.dumps(kw["json"])
    else:
        body = repr(kw.get("data", kw.get("content")))
    return f"{kw['method']} {url} headers={headers} body={body}"


def failure_titles(exc: BaseException) -> list[str]:
    if isinstance(exc, FailureGroup):
        return [t for e in exc.exceptions for t in failure_titles(e)]
    if isinstance(exc, Failure):
        return [f"{exc.title}: {exc.message}".strip()]
    return [f"{type(exc).__name__}: {exc}"]


def failure_kind(problem: str) -> str:
    """Problems that differ only in drawn values count once."""
    return re.sub(r"\d+(\.\d+)?|'[^']*'|\"[^\"]*\"", "#", problem.splitlines()[0])[:160]


# ---- the run ----------------------------------------------------------------------------------


def test_every_route_is_fuzzed(api_schema):
    """ROUTES is the schema's list of operations: a new route cannot go unfuzzed."""
    schema_routes = set()
    for result in api_schema.get_all_operations():
        operation = result.ok()
        schema_routes.add((operation.method.upper(), operation.path))
    assert schema_routes == set(ROUTES)


@pytest.mark.parametrize("method,path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_route_survives_fuzzing(fuzz_server, api_schema, session, method, path):
    operation = api_schema[path][method]
    modes = [GenerationMode.POSITIVE]
    if operation.path_parameters or operation.query or operation.body:
        modes.append(GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(mode) for mode in modes))
    statuses: Counter[int] = Counter()
    failures: dict[str, str] = {}

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases, served_model=st.sampled_from([True] * 4 + [False]),
           authenticate=st.sampled_from([True] * 9 + [False]))
    def fuzz(case, served_model, authenticate):
        if touches_admin_key(case):
            return
        case = shape(case, served_model, authenticate, fuzz_server.key)
        try:
            response = case.call(base_url=fuzz_server.base_url, session=session, timeout=120)
        except requests.RequestException as exc:  # a hang or a crash: no status at all
            statuses[0] += 1
            failures.setdefault(failure_kind(f"no response: {type(exc).__name__}"), (
                f"no response: {exc}\n  request: {request_text(case, fuzz_server)}"))
            return
        statuses[response.status_code] += 1
        problems = []
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, FailureGroup) as exc:
            problems += failure_titles(exc)
        problems += own_problems(response)
        for problem in problems:
            failures.setdefault(failure_kind(problem), (
                f"{problem}\n  request: {request_text(case, fuzz_server)}\n"
                f"  response: {response.status_code} {response.content[:300]!r}"))

    fuzz()
    print(f"{method} {path}: statuses {dict(statuses)}")
    assert not failures, f"{method} {path}: {len(failures)} kind(s) of failure " \
        f"(statuses {dict(statuses)}):\n\n" + "\n\n".join(failures.values())
    if (method, path) in MUST_SUCCEED:
        assert statuses[200] > 0, f"never a 200 from {method} {path}: {dict(statuses)}"


def metric(server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert values, f"{name} missing from /metrics"
    return sum(float(v) for v in values)


def test_engine_idle_and_healthy_after_fuzzing(fuzz_server):
    """Runs after the fuzz tests (module order): nothing they sent is left running or queued,
    no KV block is still referenced, and the server still answers /health with 200."""
    gauges = ("tokenmill_requests_running", "tokenmill_requests_waiting",
              "tokenmill_kv_cache_usage_ratio")
    deadline = time.monotonic() + 15
    while (values := {g: metric(fuzz_server, g) for g in gauges}) != dict.fromkeys(gauges, 0.0):
        assert time.monotonic() < deadline, f"engine not idle after fuzzing: {values}"
        time.sleep(0.2)
    assert httpx.get(fuzz_server.base_url + "/health", timeout=10).status_code == 200
