"""`tokenmill serve --replicas 2`: the default model as two engine replicas on a local Ray Serve
(one thread each), this server process the ingress. The same greedy output as one process;
requests sharing a long prefix land on the replica holding it (its prefix cache reports the
hits); hanging up aborts the request on its replica; a replica killed under load fails only its
own requests, Ray Serve replaces it, and traffic goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest
import torch

from server_live import (MAX_MODEL_LEN, MODEL_ID, descendants_running, free_port,
                         hang_up_streams, start_server, stop_server, tokenmill_command)

PROMPTS = ["Name a colour.", "What is 2 + 2?", "Write one word about the sea."]
LONG_SYSTEM = "You answer in one short sentence, politely and precisely. " * 24  # ~300 tokens


@pytest.fixture(scope="module")
def replicas(default_model_path, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("replicas"), [
        "--model", str(default_model_path), "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-gib", "0.25", "--replicas", "2", "--replica-threads", "1"])
    yield server
    stop_server(server)


def chat(server, messages, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"},
                      json={"model": MODEL_ID, "messages": messages, "temperature": 0,
                            "max_tokens": 12, **body})


def streamed_text(server, messages, on_first_event=None, **body) -> tuple[str, list[dict]]:
    """The streamed content and every parsed event (error events included); `on_first_event`
    is called once the first event has arrived."""
    import json

    events = []
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"},
                      json={"model": MODEL_ID, "messages": messages, "temperature": 0,
                            "max_tokens": 12, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 1 and on_first_event is not None:
                    on_first_event()
    text = "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in events if e.get("choices"))
    return text, events


def replica_processes(server) -> list[psutil.Process]:
    """The engine replicas' actor processes of this server's local Ray cluster."""
    return descendants_running(server.proc.pid, "ServeReplica:", ":engine")


def test_two_replicas_give_the_same_greedy_output_as_one_process_streamed_or_not(
        replicas, server):
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        one = chat(server, messages)
        assert one.status_code == 200, one.text
        expected = one.json()["choices"][0]["message"]["content"]
        two = chat(replicas, messages)
        assert two.status_code == 200, two.text
        assert two.json()["choices"][0]["message"]["content"] == expected
        for count in ("prompt_tokens", "completion_tokens"):
            assert two.json()["usage"][count] == one.json()["usage"][count]
        text, events = streamed_text(replicas, messages)
        assert text == expected
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_requests_are_refused_at_the_ingress_with_openai_errors(replicas):
    too_long = chat(replicas, [{"role": "user", "content": "hi " * 2000}])
    assert too_long.status_code == 400
    assert too_long.json()["error"]["type"] == "invalid_request_error"
    bad_schema = chat(replicas, [{"role": "user", "content": "hi"}], response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert bad_schema.status_code == 400


def test_requests_sharing_a_long_prefix_land_on_the_replica_that_holds_it(replicas):
    """The first request fills one replica's cache; each later one is routed there and its
    prompt is served from that cache (random routing would miss half the time: 1 in 32 to hit
    all five)."""
    cached = []
    for i in range(6):
        r = chat(replicas, [{"role": "system", "content": LONG_SYSTEM},
                            {"role": "user", "content": f"Question number {i}?"}], max_tokens=1)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0
    assert all(hit >= 256 for hit in cached[1:]), cached


def test_hanging_up_aborts_the_request_on_the_replica_that_runs_it(replicas):
    """Four long streams are dropped after their first tokens: had their replicas gone on
    generating (900 tokens each, ignore_eos), they would burn a core each for a minute; once
    aborted, the replicas' processes sit idle."""
    hang_up_streams(replicas, 4)
    time.sleep(2)  # the cancellations reach the replicas
    processes = replica_processes(replicas)
    before = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
    time.sleep(3)
    after = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
    assert after - before < 1.0, f"the replicas used {after - before:.1f} CPU-s in 3 s"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(replicas):
    """The replica killed is the busier one (the router may well have sent every request to one
    replica, their prompts sharing the chat template's first blocks): its requests end with an
    OpenAI error event, any others complete, and none hangs. It is killed once every stream has
    begun, far from its 160th token."""
    processes = replica_processes(replicas)
    outcomes: list[str] = []
    streaming = threading.Semaphore(0)

    def one(i: int) -> None:
        text, events = streamed_text(replicas, [{"role": "user", "content": f"Count to {i}."}],
                                     on_first_event=streaming.release, max_tokens=160,
                                     ignore_eos=True)
        errors = [e["error"] for e in events if "error" in e]
        if errors:
            assert errors[0]["code"] == "engine_unavailable", errors
            outcomes.append("failed")
        else:
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            outcomes.append("completed")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert streaming.acquire(timeout=120), "a stream did not begin"
    before = {p: cpu_seconds(p) for p in processes}
    time.sleep(1)
    victim = max(processes, key=lambda p: cpu_seconds(p) - before[p])
    [survivor] = [p for p in processes if p is not victim]
    os.kill(victim.pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert len(outcomes) == 8 and "failed" in outcomes, outcomes
    assert survivor.is_running()
    # Traffic goes on at once (the survivor), and Ray Serve starts a replacement.
    assert chat(replicas, [{"role": "user", "content": "Still there?"}]).status_code == 200
    deadline = time.monotonic() + 120
    while len(replica_processes(replicas)) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    for prompt in PROMPTS:
        assert chat(replicas, [{"role": "user", "content": prompt}]).status_code == 200


def refused_replica(model_path, home, *flags: str) -> str:
    """Run `tokenmill serve` of one one-thread replica with `flags`, which it must refuse with
    status 2; the last line it printed."""
    done = subprocess.run(tokenmill_command() + [
        "serve", "--model", str(model_path), "--no-auth", "--port", str(free_port()),
        "--kv-cache-gib", "0.25", "--replicas", "1", "--replica-threads", "1", *flags],
        env=dict(os.environ, TOKENMILL_HOME=str(home)), capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


def test_replicas_that_cannot_start_end_serve_with_their_cause_in_one_line(default_model_path,
                                                                          tmp_path):
    """7 ranks cannot split 9 attention heads: each replica's engine raises, Ray Serve gives up,
    and serve exits 2 naming the cause, not with Ray's report of the replicas' tracebacks."""
    last = refused_replica(default_model_path, tmp_path, "--tensor-parallel-size", "7")
    assert last.startswith("tokenmill serve: cannot serve SmolLM2-135M-Instruct from ")
    assert last.endswith("ValueError: --tensor-parallel-size 7 must divide the model's attention "
                         "heads (9), key-value heads (3; they are split, not replicated) and "
                         "intermediate size (1536): 1, 3 would")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU for the replica")
def test_replicas_this_machine_cannot_hold_end_serve_at_once_instead_of_waiting_for_ever(
        default_model_path, tmp_path):
    """A replica that wants a GPU, on a machine without one: Ray Serve would wait for ever for
    it to be scheduled; serve exits 2 before deploying anything, naming what is missing."""
    assert refused_replica(default_model_path, tmp_path, "--device", "cuda") == (
        "tokenmill serve: this machine cannot hold the replicas: no node has 1 CPU, 1 GPU for "
        "one bundle")
