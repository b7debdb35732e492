"""Soak test: a real `tokenmill serve` under a steady mixed load for a set time, watched for leaks.

Starts `tokenmill serve` on the default model on 127.0.0.1 (the command line of live_server.py;
with keys and the usage ledger on unless --no-auth: the admin key from $TOKENMILL_HOME/admin.key)
in a throwaway $TOKENMILL_HOME, then keeps --clients clients busy for --minutes with a mix drawn
from --seed: chat and completions, streamed or not, max_tokens 8..128, `ignore_eos` on some,
n=2 on some, a shared system prompt (prefix cache) and long prompts (chunked prefill) on some,
stop strings and logprobs on a few; about 5% hang-ups (a stream closed after a random number of
content chunks) and about 5% bad requests (invalid JSON, unknown model, negative max_tokens, a
field of the wrong type, a prompt longer than the served context), each of which must get a 4xx.

Every --sample-seconds it records one row: the server process's RSS, CPU, threads and open file
descriptors; KV cache usage, running and waiting requests and HTTP in-flight from /metrics;
generated tokens/s; the responses finished in the interval by status class (2xx/4xx/5xx), error
events inside 200 streams, hang-ups, client-side failures (connection errors, timeouts,
malformed streams), bad requests that did not get a 4xx and good ones that did; and p50/p90/p99
of end-to-end latency (good requests that completed) and of time to first token (streams).
One line per row is printed as it is taken. When the time is up no new request starts, the
requests in flight get --finish-seconds (120) to finish, then their clients hang up, and the
server must drain within --settle-seconds (60): nothing running, waiting or in flight and KV
usage back to 0. With keys on, the ledger's records are then counted by status against what
the clients saw. The run is bounded (start-up, --minutes, those two) and the server is stopped
with SIGTERM at the end, on Ctrl-C, on SIGTERM to this script and on errors (and, being started
with PR_SET_PDEATHSIG, if this script is killed outright).

    .venv/bin/python benchmarks/soak.py --minutes 30                 # the soak: 30 min, 32 clients
    .venv/bin/python benchmarks/soak.py --minutes 2 --sample-seconds 20   # a smoke run

Writes to --out (default benchmarks/results/soak-<UTC timestamp>/): samples.csv (one row per
sample), requests.csv (one row per request), summary.json (arguments, machine: CPU model, cores,
torch version; totals, overall latency percentiles, RSS figures, the verdict), server.log (the
server's stderr) and soak.png, when matplotlib is importable (`pip install matplotlib`; it is not
a tokenmill dependency: without it the plot is skipped with a message, and
`soak.py --plot-only DIR` draws it later from DIR/samples.csv).

Run it alone on the machine: other CPU work on the same cores (tests, other servers) slows every
step and stretches latencies until requests time out, which says nothing of the server.

Reading the plot (x: minutes since the load started; the point at 0 is the idle server before
it; the last two, after the dashed line, are the drain and the idle server after it): RSS should
rise while the first requests warm the allocator and then stay flat; a steady slope over the
whole run is a leak (summary.json gives the least-squares slope in MiB/hour). KV usage follows
the load and must drop to 0 once it stops. Running and waiting show the batch: waiting above 0
for long means the server cannot keep up with --clients. The bottom panel is 5xx responses and
stream error events per interval (must be none) with client-side errors (connection failures,
timeouts) beside them.

The verdict: RSS growth from the first to the last sample under load, the first sample excluded
as warm-up, in MiB and %; KV usage once drained (must be 0); 5xx and stream error events (must be
0); bad requests answered other than 4xx (must be 0). The exit status is 1 when any of those
fails or the server died, 2 when the server did not start, 130 when interrupted (what was
gathered is still written), else 0. Client errors, unexpected 4xx, malformed streams and ledger
mismatches are printed as warnings.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import random
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from live_server import _healthy, free_port
from tokenmill.models.default import DEFAULT_MODEL_ID, default_model_path

MIB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"

PROMPTS = [
    "Write a short story about a cat who learns to fly.",
    "Explain how rain forms, step by step.",
    "List ten uses of a paperclip.",
    "Describe the city of Paris in detail.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "Count from one to twenty in words.",
]
SYSTEM = ("You are a helpful, careful assistant working for a small bakery. " * 4 +
          "Answer customers' questions about opening hours (8 to 18, Monday to Saturday), "
          "prices (bread 3 euros, croissant 1.50, cake slices 4), allergens (gluten, milk, eggs, "
          "nuts in some cakes) and orders (at least a day ahead, by phone or in the shop). "
          "Be polite and brief, never invent products, and say when you do not know. ") * 3
WORDS = ("time year people way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question work "
         "government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father "
         "power hour game line end member law car city community name president team minute idea "
         "kid body information back parent face others level office door health person art war "
         "history party result change morning reason research girl guy moment air teacher force "
         "education foot boy age policy process music market sense nation plan college interest "
         "death experience effect use class control care field development role effort rate heart "
         "drug show leader light voice wife police mind price report decision son view "
         "relationship "
         "town road arm difference value building action model season society tax director "
         "position player record paper space ground form event official matter center couple site "
         "project activity star table need court oil situation cost industry figure street image "
         "phone data picture practice piece land product doctor wall patient worker news "
         "test movie "
         "north love support technology step baby computer type attention film tree source organ "
         "rule truth husband chance brother evidence thought").split()
BAD_KINDS = ("invalid_json", "unknown_model", "negative_max_tokens", "wrong_type",
             "oversize_prompt")
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


# ---- the server ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM it when this script dies (even by SIGKILL)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """`tokenmill serve` as live_server.py starts it (same command line), but holding the process
    (its pid is what we measure) and its stderr (server.log)."""

    def __init__(self, model: Path, home: str, options: list[str], auth: bool, log_path: Path):
        self.port = free_port()
        tokenmill = Path(sys.executable).with_name("tokenmill")
        self.command = [str(tokenmill), "serve", "--model", str(model), "--port", str(self.port),
                        *([] if auth else ["--no-auth"]), *options]
        self.home, self.log_path = home, log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, timeout_s: float) -> None:
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            # stdout: the admin key is printed there on first start; it is never kept.
            self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=log,
                                         env=dict(os.environ, TOKENMILL_HOME=self.home),
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not _healthy(self.url):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {self.proc.returncode} "
                                   f"(see {self.log_path})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tokenmill serve not healthy after {timeout_s:.0f} s "
                                   f"(see {self.log_path})")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (the server drains for up to its --drain-timeout), SIGKILL after 90 s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode


class ProcStats:
    """RSS, CPU time, threads and open fds of one process: psutil when installed, else /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            import psutil
            self._ps = psutil.Process(pid)
        except ImportError:
            self._ps = None

    def read(self) -> dict:
        """{rss_mib, cpu_s, threads, fds}; NaN for all of them once the process is gone."""
        try:
            if self._ps is not None:
                with self._ps.oneshot():
                    cpu = self._ps.cpu_times()
                    return {"rss_mib": self._ps.memory_info().rss / MIB,
                            "cpu_s": cpu.user + cpu.system, "threads": self._ps.num_threads(),
                            "fds": self._ps.num_fds()}
            status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
            fields_ = {line.split(":")[0]: line.split(":")[1].split() for line in status}
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return {"rss_mib": int(fields_["VmRSS"][0]) * 1024 / MIB,
                    "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
                    "threads": int(fields_["Threads"][0]),
                    "fds": len(os.listdir(f"/proc/{self.pid}/fd"))}
        except Exception:  # gone (psutil.NoSuchProcess, FileNotFoundError), a zombie
            return {"rss_mib": math.nan, "cpu_s": math.nan, "threads": math.nan, "fds": math.nan}


async def scrape(client: httpx.AsyncClient) -> dict | None:
    """The gauges and counters this script follows from /metrics (summed over models; KV usage:
    the highest), or None when the server does not answer."""
    try:
        r = await client.get("/metrics", timeout=15)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    out = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0, "http_in_flight": 0.0,
           "gen_tokens": 0.0, "outcomes": {}}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == "tokenmill_requests_running":
                out["running"] += s.value
            elif s.name == "tokenmill_requests_waiting":
                out["waiting"] += s.value
            elif s.name == "tokenmill_kv_cache_usage_ratio":
                out["kv_usage"] = max(out["kv_usage"], s.value)
            elif s.name == "tokenmill_http_requests_in_flight":
                out["http_in_flight"] += s.value
            elif s.name == "tokenmill_generation_tokens_total":
                out["gen_tokens"] += s.value
            elif s.name == "tokenmill_requests_total":
                outcome = s.labels.get("outcome", "?")
                out["outcomes"][outcome] = out["outcomes"].get(outcome, 0.0) + s.value
    return out


# ---- the load -----------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request to send."""

    endpoint: str  # chat | completions
    body: dict | None  # JSON body (None: `raw`)
    raw: bytes | None = None  # an invalid JSON body
    stream: bool = False
    n: int = 1
    max_tokens: int = 0
    bad: str = ""  # one of BAD_KINDS: must get a 4xx
    hangup_after: int = 0  # close the stream after this many content chunks (0: read it all)


@dataclass
class Record:
    """What the client saw of one request."""

    t: float  # seconds since the load started, at the end of the request
    endpoint: str
    stream: bool
    n: int
    max_tokens: int
    bad: str
    hangup: bool  # the client closed the stream early, as planned
    status: int  # HTTP status, 0 when none came
    error: str  # "", timeout, connection, stream_error, malformed
    detail: str  # the error's code or message, short
    e2e_s: float  # request sent -> last byte read (or the hang-up)
    ttft_s: float  # request sent -> first content chunk, streams only (NaN otherwise)
    completion_tokens: int  # from `usage` where the response had it, else -1


def make_spec(rng: random.Random, model: str, context: int, bad_frac: float,
              hangup_frac: float) -> Spec:
    r = rng.random()
    endpoint = rng.choice(("chat", "completions"))
    if r < bad_frac:
        return bad_spec(rng, endpoint, model, context)
    hangup = r < bad_frac + hangup_frac
    stream = hangup or rng.random() < 0.5
    max_tokens = rng.randint(8, 128)
    n = 2 if rng.random() < 0.15 else 1
    ignore_eos = rng.random() < 0.3
    hangup_after = 0
    if hangup:  # long enough that the client leaves well before the end
        ignore_eos, max_tokens = True, max(max_tokens, 32)
        hangup_after = rng.randint(1, max_tokens // 2)
    body = {"model": model, "max_tokens": max_tokens, "n": n, "stream": stream,
            "temperature": rng.choice((0.0, 0.7, 1.0)), "ignore_eos": ignore_eos}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1 << 31)
    if rng.random() < 0.1:
        body["stop"] = ["\n\n"]
    system = rng.random() < 0.3  # a shared prefix: the prefix cache
    if rng.random() < 0.1:  # a long prompt: chunked prefill, within the context
        words = rng.randint(200, max(200, min(1500, context // 4)))
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + "\n\nSummarize the text above."
    else:
        text = rng.choice(PROMPTS)
    logprobs = rng.random() < 0.05
    if endpoint == "chat":
        body["messages"] = ([{"role": "system", "content": SYSTEM}] if system else []) + \
            [{"role": "user", "content": text}]
        if logprobs:
            body.update(logprobs=True, top_logprobs=2)
    else:
        body["prompt"] = (SYSTEM + "\n\n" if system else "") + f"Question: {text}\nAnswer:"
        if logprobs:
            body["logprobs"] = 2
    return Spec(endpoint, body, stream=stream, n=n, max_tokens=max_tokens,
                hangup_after=hangup_after)


def bad_spec(rng: random.Random, endpoint: str, model: str, context: int) -> Spec:
    kind = rng.choice(BAD_KINDS)
    stream = rng.random() < 0.5
    body: dict = {"model": model, "max_tokens": 16, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    if kind == "invalid_json":
        text = json.dumps(body)
        return Spec(endpoint, None, raw=text[:rng.randint(1, len(text) - 1)].encode(),
                    stream=stream, bad=kind)
    if kind == "unknown_model":
        body["model"] = "no-such-model-soak"
    elif kind == "negative_max_tokens":
        body["max_tokens"] = -rng.randint(1, 100)
    elif kind == "wrong_type":
        name, value = rng.choice([("n", "2"), ("stream", "yes"), ("max_tokens", "16"),
                                   ("temperature", "hot"),
                                   ("messages", "hello") if endpoint == "chat" else ("prompt", 42)])
        body[name] = value
    else:  # oversize_prompt: more tokens than the served context (" hello" is one token or more)
        text = " hello" * (context + 512)
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
    return Spec(endpoint, body, stream=stream, bad=kind)


async def send(client: httpx.AsyncClient, spec: Spec, t0: float, timeout_s: float) -> Record:
    start = time.monotonic()
    status, error, detail, ttft, tokens, hung_up = 0, "", "", math.nan, -1, False
    path = ENDPOINTS[spec.endpoint]
    try:
        if spec.raw is not None:
            r = await client.post(path, content=spec.raw, timeout=timeout_s,
                                  headers={"content-type": "application/json"})
            status, detail = r.status_code, _error_code(r)
        elif spec.stream:
            async with client.stream("POST", path, json=spec.body, timeout=timeout_s) as r:
                status = r.status_code
                if status != 200:
                    await r.aread()
                    detail = _error_code(r)
                else:
                    error, detail, ttft, tokens, hung_up = await read_stream(r, spec, start)
        else:
            r = await client.post(path, json=spec.body, timeout=timeout_s)
            status = r.status_code
            if status == 200:
                body = r.json()
                if len(body.get("choices", ())) != spec.n:
                    error, detail = "malformed", f"{len(body.get('choices', ()))} choices"
                tokens = (body.get("usage") or {}).get("completion_tokens", -1)
            else:
                detail = _error_code(r)
    except httpx.TimeoutException as exc:
        error, detail = "timeout", type(exc).__name__
    except httpx.TransportError as exc:  # refused, reset, closed mid-body
        error, detail = "connection", type(exc).__name__
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        error, detail = "malformed", f"{type(exc).__name__}: {exc}"[:120]
    end = time.monotonic()
    return Record(end - t0, spec.endpoint, spec.stream, spec.n, spec.max_tokens, spec.bad,
                  hung_up, status, error, detail, end - start, ttft, tokens)


async def read_stream(r: httpx.Response, spec: Spec, start: float):
    """(error, detail, ttft, completion tokens, hung up) of a 200 SSE stream."""
    error, detail, ttft, tokens = "", "", math.nan, -1
    content_chunks, done, finished = 0, False, set()
    key = "text" if spec.endpoint == "completions" else None
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = "stream_error"
            detail = str(chunk["error"].get("code") or chunk["error"].get("message"))[:120]
            continue
        for choice in chunk.get("choices", ()):
            text = choice.get(key) if key else (choice.get("delta") or {}).get("content")
            if text:
                content_chunks += 1
            if choice.get("finish_reason"):
                finished.add(choice["index"])
            # The first token: text, or a finish with none (an EOS first); not chat's role chunk.
            if math.isnan(ttft) and (text or choice.get("finish_reason")):
                ttft = time.monotonic() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if spec.hangup_after and content_chunks >= spec.hangup_after:
            return error, detail, ttft, tokens, True  # leaving the `async with` closes it
    if not error:
        if not done:
            error, detail = "malformed", "stream ended without [DONE]"
        elif len(finished) != spec.n:
            error, detail = "malformed", f"{len(finished)} of {spec.n} choices finished"
    return error, detail, ttft, tokens, False


def _error_code(r: httpx.Response) -> str:
    if r.status_code < 400:
        return ""
    try:
        err = r.json()["error"]
        return str(err.get("code") or err.get("type"))[:120]
    except Exception:
        return r.text[:120]


# ---- samples ------------------------------------------------------------------------------------

SAMPLE_FIELDS = ["t_s", "phase", "server_alive", "rss_mib", "server_cpu_pct", "threads", "fds",
                 "kv_usage", "running", "waiting", "http_in_flight", "gen_tokens_per_s",
                 "finished", "s2xx", "s4xx", "s5xx", "stream_errors", "hangups", "conn_errors",
                 "timeouts", "malformed", "cancelled", "bad_not_4xx", "good_4xx", "server_ok",
                 "server_error", "server_disconnected", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
                 "ttft_p50_s", "ttft_p90_s", "ttft_p99_s"]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def good_latencies(records: list[Record]) -> tuple[list[float], list[float]]:
    """End-to-end latencies of good requests that completed, and the TTFTs of their streams."""
    ok = [r for r in records if not r.bad and not r.hangup and not r.error and
          200 <= r.status < 300]
    return [r.e2e_s for r in ok], [r.ttft_s for r in ok if r.stream and not math.isnan(r.ttft_s)]


def counts(records: list[Record]) -> dict:
    def n(pred) -> int:
        return sum(1 for r in records if pred(r))

    return {
        "finished": len(records),
        "s2xx": n(lambda r: 200 <= r.status < 300),
        "s4xx": n(lambda r: 400 <= r.status < 500),
        "s5xx": n(lambda r: r.status >= 500),
        "stream_errors": n(lambda r: r.error == "stream_error"),
        "hangups": n(lambda r: r.hangup),
        "conn_errors": n(lambda r: r.error == "connection"),
        "timeouts": n(lambda r: r.error == "timeout"),
        "malformed": n(lambda r: r.error == "malformed"),
        "cancelled": n(lambda r: r.error == "cancelled"),
        "bad_not_4xx": n(lambda r: r.bad and r.status and not 400 <= r.status < 500),
        "good_4xx": n(lambda r: not r.bad and 400 <= r.status < 500),
    }


class Sampler:
    """Takes the rows: each one covers the requests finished since the one before."""

    def __init__(self, client: httpx.AsyncClient, server: Server, run: Run):
        self.client, self.server = client, server
        self.records, self.rows = run.records, run.rows
        self.stats = ProcStats(server.pid)
        self.seen = 0  # records already in a row
        self.t0 = self.last_t = time.monotonic()
        self.last_cpu = self.stats.read()["cpu_s"]
        self.last_metrics: dict | None = None

    async def prime(self) -> None:
        """The idle server before the load: a row of its own (phase `idle`, at t=0); the load
        starts right after it."""
        self.last_metrics = await scrape(self.client)
        await self.take("idle")
        self.t0 = self.last_t = time.monotonic()

    async def take(self, phase: str) -> dict:
        now = time.monotonic()
        new, self.seen = self.records[self.seen:], len(self.records)
        proc = self.stats.read()
        metrics = await scrape(self.client)
        dt = max(now - self.last_t, 1e-9)
        row = {"t_s": round(now - self.t0, 1), "phase": phase,
               "server_alive": int(self.server.alive()),
               "rss_mib": proc["rss_mib"], "threads": proc["threads"], "fds": proc["fds"],
               "server_cpu_pct": 100 * (proc["cpu_s"] - self.last_cpu) / dt
               if phase != "idle" else math.nan}
        for name in ("kv_usage", "running", "waiting", "http_in_flight"):
            row[name] = metrics[name] if metrics else math.nan
        prev = self.last_metrics
        if metrics and prev and phase != "idle":
            row["gen_tokens_per_s"] = (metrics["gen_tokens"] - prev["gen_tokens"]) / dt
            for outcome in ("ok", "error", "disconnected"):
                row[f"server_{outcome}"] = int(metrics["outcomes"].get(outcome, 0)
                                               - prev["outcomes"].get(outcome, 0))
        else:
            row["gen_tokens_per_s"] = math.nan
            row.update(server_ok=0, server_error=0, server_disconnected=0)
        row.update(counts(new))
        e2e, ttft = good_latencies(new)
        for q in (50, 90, 99):
            row[f"e2e_p{q}_s"] = percentile(e2e, q)
            row[f"ttft_p{q}_s"] = percentile(ttft, q)
        if metrics:
            self.last_metrics = metrics
        if not math.isnan(proc["cpu_s"]):
            self.last_cpu = proc["cpu_s"]
        self.last_t = now
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


def format_row(row: dict) -> str:
    def f(v, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return (f"[{row['t_s']:>7.0f}s {row['phase']:<5}] rss {f(row['rss_mib'], '.1f')} MiB "
            f"cpu {f(row['server_cpu_pct'], '.0f')}% fds {f(row['fds'], '.0f')} | "
            f"kv {f(row['kv_usage'], '.3f')} run {f(row['running'], '.0f')} "
            f"wait {f(row['waiting'], '.0f')} | {f(row['gen_tokens_per_s'], '.0f')} tok/s | "
            f"done {row['finished']} 2xx {row['s2xx']} 4xx {row['s4xx']} 5xx {row['s5xx']} "
            f"streamerr {row['stream_errors']} hang {row['hangups']} "
            f"clierr {row['conn_errors'] + row['timeouts']} malformed {row['malformed']} "
            f"cancel {row['cancelled']} "
            f"bad!4xx {row['bad_not_4xx']} good4xx {row['good_4xx']} | "
            f"e2e p50/90/99 {f(row['e2e_p50_s'], '.2f')}/{f(row['e2e_p90_s'], '.2f')}/"
            f"{f(row['e2e_p99_s'], '.2f')} s ttft {f(row['ttft_p50_s'], '.2f')}/"
            f"{f(row['ttft_p90_s'], '.2f')}/{f(row['ttft_p99_s'], '.2f')} s")


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the run has gathered, kept when it is interrupted."""

    records: list[Record] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    context: int = 0
    load_s: float = math.nan  # from the start of the load to the last request's end
    drained: bool = False
    after: dict | None = None  # the row taken once the server drained (or gave up)
    cancelled_at_end: int = 0
    ledger: dict | None = None
    interrupted: bool = False


async def soak(args, server: Server, key: str | None, run: Run) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=args.clients + 8,
                          max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits,
                                 timeout=args.request_timeout) as client:
        models = (await client.get("/v1/models")).json()["data"]
        card = next(m for m in models if m["id"] == DEFAULT_MODEL_ID)
        run.context = card["context_length"]
        print(f"serving {card['id']}, context {run.context}", flush=True)

        sampler = Sampler(client, server, run)
        await sampler.prime()
        t0 = sampler.t0
        deadline = t0 + 60 * args.minutes
        stop = asyncio.Event()

        async def worker(i: int) -> None:
            rng = random.Random(f"{args.seed}-{i}")
            while time.monotonic() < deadline and not stop.is_set():
                spec = make_spec(rng, DEFAULT_MODEL_ID, run.context, args.bad_fraction,
                                 args.hangup_fraction)
                started = time.monotonic()
                try:
                    record = await send(client, spec, t0, args.request_timeout)
                except asyncio.CancelledError:  # still in flight past --finish-seconds
                    now = time.monotonic()
                    run.records.append(Record(now - t0, spec.endpoint, spec.stream, spec.n,
                                              spec.max_tokens, spec.bad, False, 0, "cancelled",
                                              "in flight when the run ended", now - started,
                                              math.nan, -1))
                    raise
                run.records.append(record)
                if record.error == "connection":
                    await asyncio.sleep(0.5)  # a dead server must not turn this into a spin

        async def sample_loop() -> None:
            k = 1
            while t0 + k * args.sample_seconds <= deadline + 1e-6 and not stop.is_set():
                await asyncio.sleep(max(0.0, t0 + k * args.sample_seconds - time.monotonic()))
                await sampler.take("load")
                if not server.alive():
                    print("the server died", flush=True)
                    stop.set()
                k += 1

        workers = [asyncio.create_task(worker(i)) for i in range(args.clients)]
        try:
            await sample_loop()
            # Time is up: no new request starts; those in flight get --finish-seconds to end,
            # then their clients hang up (the server must free their KV blocks all the same).
            stop.set()
            _, pending = await asyncio.wait(workers, timeout=args.finish_seconds)
            run.cancelled_at_end = len(pending)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        run.load_s = time.monotonic() - t0
        await sampler.take("drain")

        # The server drains: nothing running or waiting, no KV block in use, nothing in flight.
        settle = time.monotonic() + args.settle_seconds
        while server.alive() and time.monotonic() < settle:
            m = await scrape(client)
            if m and m["running"] == 0 and m["waiting"] == 0 and m["kv_usage"] == 0 \
                    and m["http_in_flight"] == 0:
                run.drained = True
                break
            await asyncio.sleep(0.5)
        run.after = await sampler.take("after")


def ledger_counts(home: str) -> dict | None:
    """Usage records by status, read from the server's SQLite store (read-only)."""
    path = Path(home) / "tokenmill.db"
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM usage_records GROUP BY status")
            return {status: count for status, count in rows}
    except sqlite3.Error as exc:
        return {"unreadable": str(exc)}


def rss_trend(rows: list[dict]) -> dict:
    """RSS growth over the load samples after the first (warm-up): first -> last, and the
    least-squares slope in MiB/hour."""
    load = [r for r in rows if r["phase"] == "load" and not math.isnan(r["rss_mib"])]
    post = load[1:]
    out: dict = {"samples_after_warmup": len(post)}
    if len(post) < 2:
        return out
    first, last = post[0]["rss_mib"], post[-1]["rss_mib"]
    ts = [r["t_s"] for r in post]
    ys = [r["rss_mib"] for r in post]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0
    out.update(first_mib=first, last_mib=last, growth_mib=last - first,
               growth_pct=100 * (last - first) / first, slope_mib_per_hour=slope * 3600,
               first_t_s=post[0]["t_s"], last_t_s=post[-1]["t_s"],
               peak_mib=max(r["rss_mib"] for r in load))
    return out


def verdict(run: Run, returncode: int | None) -> tuple[list[str], list[str], list[str]]:
    """(failures, warnings, notes) of a run."""
    total = counts(run.records)
    failures, warnings, notes = [], [], []
    if run.interrupted:
        failures.append("interrupted before the end")
    if total["s5xx"]:
        failures.append(f"{total['s5xx']} responses with a 5xx")
    if total["stream_errors"]:
        failures.append(f"{total['stream_errors']} error events inside 200 streams")
    if total["bad_not_4xx"]:
        failures.append(f"{total['bad_not_4xx']} bad requests answered other than 4xx")
    if any(not r["server_alive"] for r in run.rows):
        failures.append("the server died during the run")
    if run.after is not None and not run.drained:
        a = run.after
        failures.append(f"the server did not drain within --settle-seconds: KV usage "
                        f"{a['kv_usage']}, running {a['running']}, waiting {a['waiting']}, "
                        f"in flight {a['http_in_flight']}")
    if total["conn_errors"] or total["timeouts"]:
        warnings.append(f"client errors: {total['conn_errors']} connection failures, "
                        f"{total['timeouts']} timeouts")
    if total["malformed"]:
        warnings.append(f"{total['malformed']} malformed responses")
    if total["good_4xx"]:
        warnings.append(f"{total['good_4xx']} good requests answered 4xx")
    if returncode not in (0, None, -signal.SIGTERM):
        warnings.append(f"the server exited with {returncode} on SIGTERM")
    if run.cancelled_at_end:
        notes.append(f"{run.cancelled_at_end} requests still in flight --finish-seconds after "
                     "the load stopped: their clients hung up")
    if run.ledger is not None and "unreadable" not in run.ledger:
        completed = len(good_latencies(run.records)[0])
        left = total["hangups"] + total["cancelled"] + total["timeouts"]
        got = {k: run.ledger.get(k, 0) for k in ("completed", "aborted", "error")}
        line = (f"ledger: {got['completed']} completed (clients got {completed} complete "
                f"responses), {got['aborted']} aborted (clients left {left}: hang-ups, "
                f"cancelled, timeouts), {got['error']} error")
        if got["completed"] != completed or got["aborted"] > left or got["error"]:
            warnings.append(line)
        else:
            notes.append(line)
    return failures, warnings, notes


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    mem = None
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    except (ValueError, OSError):
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "mem_gib": mem,
            "torch": version("torch"), "tokenmill": version("tokenmill"),
            "python": platform.python_version(), "platform": platform.platform(),
            "hostname": platform.node()}


def write_csv(path: Path, rows: list[dict], names: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def _clean(value):
    """JSON without NaN (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ---- the plot -----------------------------------------------------------------------------------


def plot(out: Path, title: str) -> Path | None:
    """soak.png from out/samples.csv, or None (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot (pip install matplotlib, then "
              f"benchmarks/soak.py --plot-only {out})", flush=True)
        return None
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # the idle row first, at t=0

    def col(name: str) -> list[float]:
        return [float(r[name]) if r[name] not in ("", "nan") else math.nan for r in rows]

    t = [v / 60 for v in col("t_s")]
    fig, ax = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax[0].plot(t, col("rss_mib"), marker="o", ms=3)
    ax[0].set_ylabel("server RSS, MiB")
    ax[1].plot(t, col("kv_usage"), marker="o", ms=3, color="tab:orange")
    ax[1].set_ylabel("KV cache usage")
    ax[1].set_ylim(-0.02, max(0.1, max((v for v in col("kv_usage") if not math.isnan(v)),
                                       default=0) * 1.15))
    ax[2].plot(t, col("running"), marker="o", ms=3, label="running")
    ax[2].plot(t, col("waiting"), marker="o", ms=3, label="waiting")
    ax[2].set_ylabel("requests")
    ax[2].legend(loc="upper left")
    width = 0.3 * (t[1] - t[0]) if len(t) > 1 else 0.1
    errors5 = [a + b for a, b in zip(col("s5xx"), col("stream_errors"))]
    client = [a + b for a, b in zip(col("conn_errors"), col("timeouts"))]
    ax[3].bar([x - width / 2 for x in t], errors5, width=width, color="tab:red",
              label="5xx + stream error events")
    ax[3].bar([x + width / 2 for x in t], client, width=width, color="tab:gray",
              label="client errors (connection, timeout)")
    ax[3].set_ylabel("per interval")
    ax[3].set_ylim(0, max([1.0, *(v for v in errors5 + client if not math.isnan(v))]) * 1.2)
    ax[3].set_xlabel("minutes since the load started")
    ax[3].legend(loc="upper left")
    drain = [x for x, r in zip(t, rows) if r["phase"] in ("drain", "after")]
    for a in ax:
        a.grid(alpha=0.3)
        if drain:
            a.axvline(min(drain), color="k", ls="--", lw=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--sample-seconds", type=float, default=60.0,
                        help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--out", type=Path, help="results directory "
                        "(default: benchmarks/results/soak-<UTC timestamp>)")
    parser.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                        help="keys and the usage ledger on, requests with the admin key "
                             "(default); --no-auth serves without keys")
    parser.add_argument("--serve-options", default="",
                        help="more `tokenmill serve` options, one string (e.g. "
                             "\"--max-model-len 2048 --kv-cache-gib 1\")")
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--hangup-fraction", type=float, default=0.05)
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="client-side timeout of one request, seconds")
    parser.add_argument("--finish-seconds", type=float, default=120.0,
                        help="once the time is up, how long requests in flight may take to "
                             "finish before their clients hang up")
    parser.add_argument("--settle-seconds", type=float, default=60.0,
                        help="then how long the server may take to drain (KV usage 0)")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds the server may take to answer /health")
    parser.add_argument("--plot-only", type=Path, metavar="DIR",
                        help="only draw DIR/soak.png from DIR/samples.csv")
    args = parser.parse_args()
    if args.plot_only:
        summary = args.plot_only / "summary.json"
        title = "tokenmill soak"
        if summary.exists():
            title = json.loads(summary.read_text()).get("title", title)
        path = plot(args.plot_only, title)
        if path:
            print(f"plot: {path}")
        return 0 if path else 1

    started = datetime.now(timezone.utc)
    out = args.out or RESULTS / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"soak: {args.minutes:g} min, {args.clients} clients, sample every "
          f"{args.sample_seconds:g} s, seed {args.seed}, auth {'on' if args.auth else 'off'}; "
          f"CPU {info['cpu_model']} x{info['cpu_count']}, torch {info['torch']}; out {out}",
          flush=True)

    def terminate(signum, frame):  # SIGTERM to this script: unwind as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    home = tempfile.TemporaryDirectory(prefix="tokenmill-soak-")
    server = Server(default_model_path(), home.name, shlex.split(args.serve_options), args.auth,
                    out / "server.log")
    run, returncode = Run(), None
    try:
        t = time.monotonic()
        try:
            server.start(args.start_timeout)
        except (RuntimeError, OSError) as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        print(f"server pid {server.pid} at {server.url}, healthy after "
              f"{time.monotonic() - t:.1f} s: {' '.join(server.command)}", flush=True)
        key = (Path(home.name) / "admin.key").read_text().strip() if args.auth else None
        asyncio.run(soak(args, server, key, run))
        if args.auth:
            run.ledger = ledger_counts(home.name)
    except KeyboardInterrupt:
        run.interrupted = True
        print("\ninterrupted: stopping the server", flush=True)
    finally:
        returncode = server.stop()
        home.cleanup()
    if not run.rows:
        return 130 if run.interrupted else 1
    return report(args, out, started, info, server, run, returncode)


def report(args, out: Path, started: datetime, info: dict, server: Server, run: Run,
           returncode: int | None) -> int:
    """Write the CSVs, summary.json and the plot; print the verdict; the exit status."""
    rows, records = run.rows, run.records
    write_csv(out / "samples.csv", rows, SAMPLE_FIELDS)
    write_csv(out / "requests.csv", [asdict(r) for r in records], [f.name for f in fields(Record)])
    failures, warnings, notes = verdict(run, returncode)
    trend = rss_trend(rows)
    total = counts(records)
    e2e, ttft = good_latencies(records)
    idle, after = rows[0], run.after or rows[-1]
    by_bad: dict[str, dict[str, int]] = {}
    for r in records:
        if r.bad:
            statuses = by_bad.setdefault(r.bad, {})
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    ok = not failures
    title = (f"tokenmill soak {started:%Y-%m-%d %H:%M} UTC: {args.minutes:g} min, {args.clients} "
             f"clients, {info['cpu_model']} x{info['cpu_count']}: {'PASS' if ok else 'FAIL'}")
    load_s = run.load_s if not math.isnan(run.load_s) else (rows[-1]["t_s"] or math.nan)
    summary = {
        "title": title, "started": started.isoformat(), "args": vars(args) | {"out": str(out)},
        "command": [sys.executable, *sys.argv], "server_command": server.command,
        "server_pid": server.pid if server.proc else None, "server_exit_code": returncode,
        "machine": info, "context_length": run.context, "load_seconds": load_s,
        "totals": total, "requests_per_s": total["finished"] / load_s if load_s else None,
        "bad_requests_by_kind_and_status": by_bad,
        "errors": sorted({f"{r.error}: {r.detail}" for r in records if r.error}),
        "unexpected_statuses": sorted({f"{r.status} {r.detail}" for r in records
                                       if not r.bad and r.status >= 400}),
        "latency_s": {"e2e": {f"p{q}": percentile(e2e, q) for q in (50, 90, 99)},
                      "ttft": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)},
                      "e2e_count": len(e2e), "ttft_count": len(ttft)},
        "rss_mib": {"idle_before_load": idle["rss_mib"],
                    "after_drain": after["rss_mib"] if run.after else None, **trend},
        "kv_usage_after_drain": after["kv_usage"] if run.after else None,
        "drained": run.drained, "interrupted": run.interrupted,
        "ledger_records_by_status": run.ledger,
        "verdict": {"pass": ok, "failures": failures, "warnings": warnings, "notes": notes},
    }
    (out / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
    png = plot(out, title)

    def f(v: float, fmt: str = ".2f") -> str:
        return "-" if v is None or math.isnan(v) else format(v, fmt)

    print("\n== verdict ==")
    if "growth_mib" in trend:
        print(f"RSS after warm-up: {trend['first_mib']:.1f} MiB at {trend['first_t_s']:.0f} s -> "
              f"{trend['last_mib']:.1f} MiB at {trend['last_t_s']:.0f} s: "
              f"{trend['growth_mib']:+.1f} MiB ({trend['growth_pct']:+.2f}%), slope "
              f"{trend['slope_mib_per_hour']:+.1f} MiB/h; peak {trend['peak_mib']:.1f} MiB")
        span = trend["last_t_s"] - trend["first_t_s"]
        if span < 600:
            print(f"  (over {span:.0f} s only: the working set is still growing with the batch; "
                  "the slope tells a leak from warm-up only over a long run)")
    else:
        print("RSS after warm-up: fewer than 2 samples under load after the first")
    if run.after is None:
        print(f"RSS idle before the load {f(idle['rss_mib'], '.1f')} MiB, at the last sample "
              f"{f(after['rss_mib'], '.1f')} MiB; no drain (interrupted)")
    else:
        print(f"RSS idle before the load {f(idle['rss_mib'], '.1f')} MiB, after the drain "
              f"{f(after['rss_mib'], '.1f')} MiB")
        print(f"KV usage after the drain: {f(after['kv_usage'], '.4f')} (running "
              f"{f(after['running'], '.0f')}, waiting {f(after['waiting'], '.0f')}): "
              f"{'0, ok' if run.drained else 'NOT DRAINED'}")
    print(f"requests: {total['finished']} in {load_s:.0f} s: 2xx {total['s2xx']}, 4xx "
          f"{total['s4xx']} (bad requests {sum(r.bad != '' for r in records)}), 5xx "
          f"{total['s5xx']}, stream error events {total['stream_errors']}, hang-ups "
          f"{total['hangups']}, client errors {total['conn_errors']} connection + "
          f"{total['timeouts']} timeouts, cancelled at the end {total['cancelled']}")
    lat = summary["latency_s"]
    print(f"latency ({len(e2e)} complete, {len(ttft)} streams): e2e p50/p90/p99 "
          f"{f(lat['e2e']['p50'])}/{f(lat['e2e']['p90'])}/{f(lat['e2e']['p99'])} s, ttft "
          f"{f(lat['ttft']['p50'])}/{f(lat['ttft']['p90'])}/{f(lat['ttft']['p99'])} s")
    print(f"server exit code on SIGTERM: {returncode}")
    for line in notes:
        print(f"note: {line}")
    for line in warnings:
        print(f"warning: {line}")
    for line in failures:
        print(f"FAIL: {line}")
    print(f"{'PASS' if ok else 'FAIL'}; results in {out}" + (f" (plot {png.name})" if png else ""))
    if run.interrupted:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
