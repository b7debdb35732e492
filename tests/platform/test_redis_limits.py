"""What only the Redis limiter has (its shared rules run in test_limits.py on both backends):
picodollars exact past 2^53, limits shared by limiters in threads and in processes, big windows,
expiry, reservations released as lost, a Redis that goes down and comes back, and the server's
503 for it."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_limits import FakeClock, refusals, simultaneous

from tokenmill.platform.limits import KeyUsage, LimiterUnavailable, Limits, RateLimited
from tokenmill.platform.redis_limits import DECIMALS_LUA, RedisLimiter
from tokenmill.server.errors import APIError
from tokenmill.server.state import GuardedLimiter

C = 10**13 + 1  # USD 10.000000000001: a cost that no double near 2^53 holds exactly
RPM_5 = Limits(rpm=5, tpm=None, budget_pico=None)


def test_picodollars_stay_exact_past_2_to_the_53(redis_limiters):
    limiter = redis_limiters(FakeClock())
    spent = 2**53 + 1  # a double would read 2^53
    budget = spent + 2 * C + 1
    limits = Limits(rpm=None, tpm=None, budget_pico=budget)
    a = limiter.reserve(1, limits, 1, C, spent)  # idle: the ledger's figure is taken
    b = limiter.reserve(1, limits, 1, C, 0)  # spent + C < budget
    c = limiter.reserve(1, limits, 1, 1, 0)  # spent + 2C = budget - 1
    with pytest.raises(RateLimited) as refused:  # spent + 2C + 1 = budget reaches it
        limiter.reserve(1, limits, 1, 0, 0)
    assert refused.value.message == (
        "You exceeded your current quota: this key's budget is USD 9027.199254740996 and it "
        "has spent USD 9007.199254740993 with USD 20.000000000003 reserved by requests in "
        "flight.")
    assert limiter.usage(1) == KeyUsage(3, 3, 3, 2 * C + 1, spent)
    limiter.finish(a, 1, C - 2)
    limiter.finish(b, 1, C)
    limiter.finish(c, 1, 1)
    assert limiter.usage(1) == KeyUsage(3, 3, 0, 0, spent + 2 * C - 1)
    huge, limits = 10**30 + 7, Limits(None, None, 10**30 + 9)  # past 64-bit integers too
    limiter.finish(limiter.reserve(2, limits, 1, C, huge - C), 1, C)
    limiter.reserve(2, limits, 1, 1, 0)  # huge < budget
    limiter.reserve(2, limits, 1, 1, 0)  # huge + 1 < budget
    with pytest.raises(RateLimited):  # huge + 2 reaches it
        limiter.reserve(2, limits, 1, 0, 0)
    assert limiter.usage(2) == KeyUsage(3, 3, 2, 2, huge)
    limiter.check_integrity()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # one client for all
@given(a=st.integers(0, 10**40), b=st.integers(0, 10**40))
def test_the_scripts_decimal_arithmetic_is_exact(redis_client, a, b):
    big, small = max(a, b), min(a, b)
    script = DECIMALS_LUA + ("return {combine(ARGV[1], ARGV[2], 1), combine(ARGV[1], ARGV[2], -1),"
                             " less(ARGV[1], ARGV[2]) and 1 or 0, less(ARGV[2], ARGV[1]) and 1 "
                             "or 0}")
    total, difference, below, above = redis_client.eval(script, 0, str(big), str(small))
    assert (int(total), int(difference)) == (big + small, big - small)
    assert (below, above) == (0, int(small < big))


def test_two_limiters_as_two_processes_would_have_share_one_window(redis_url, redis_limiters):
    clock = FakeClock()
    first = redis_limiters(clock)
    second = RedisLimiter.from_url(redis_url, prefix=first.prefix, clock=clock)  # own connections
    turn = itertools.count()
    results = simultaneous(12, lambda: (first, second)[next(turn) % 2].reserve(7, RPM_5, 10, 0,
                                                                                0))
    refused = refusals(results)
    assert len(refused) == 7 and {r.retry_after_s for r in refused} == {60}
    assert sorted(r.id for r in results if r not in refused) == [1, 2, 3, 4, 5]
    assert first.usage(7) == second.usage(7) == KeyUsage(5, 50, 5, 0, 0)
    second.finish(next(r for r in results if r not in refused), 4, 9)  # finished by the other
    assert first.usage(7) == KeyUsage(5, 44, 4, 0, 9)


def _six_attempts(url: str, prefix: str, start, admitted) -> None:
    """A process of its own: six reserves against rpm 5 on Redis's clock."""
    limiter = RedisLimiter.from_url(url, prefix=prefix)
    start.wait()
    count = 0
    for _ in range(6):
        try:
            limiter.reserve(7, RPM_5, 10, 0, 0)
            count += 1
        except RateLimited:
            pass
    admitted.put(count)


def test_two_processes_of_6_attempts_against_rpm_5_get_exactly_5_admissions(redis_url,
                                                                            redis_limiters):
    shared = redis_limiters()  # Redis's clock, as in production
    spawn = multiprocessing.get_context("spawn")
    start, admitted = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=_six_attempts, args=(redis_url, shared.prefix, start,
                                                         admitted)) for _ in range(2)]
    for worker in workers:
        worker.start()
    counts = [admitted.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert sum(counts) == 5
    usage = shared.usage(7)
    assert (usage.requests, usage.open) == (5, 5)


def test_a_window_of_thousands_is_refused_and_pruned_in_batches(redis_limiters):
    clock = FakeClock(0.0)
    limiter = redis_limiters(clock)
    limits = Limits(rpm=None, tpm=2500, budget_pico=None)
    for i in range(2500):  # more requests than one script command takes ids
        clock.now = i / 100
        limiter.reserve(1, limits, 1, 0, 0)
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, limits, 2, 0, 0)
    # two tokens come free when the second request (admitted at 0.01) leaves: at 60.01
    assert refused.value.message.endswith("Used 2500, Requested 2. Please try again in 35.02s.")
    assert refused.value.headers["x-ratelimit-reset-tokens"] == "1m0s"
    clock.now = 85.0
    assert limiter.usage(1) == KeyUsage(0, 0, 2500, 0, 0)
    limiter.check_integrity()


def test_idle_keys_expire_except_spent_and_ids(redis_limiters, redis_client):
    limiter = redis_limiters(FakeClock(), lost_after_s=600)
    limiter.finish(limiter.reserve(3, Limits(2, 100, 10**15), 10, 10**13 + 1, 0), 5, 12)
    limiter.reserve(3, Limits(2, 100, 10**15), 10, 7, 0)
    ttl = {name: redis_client.pttl(f"{limiter.prefix}{{3}}:{name}")
           for name in ("win", "tok", "wtok", "open", "cost", "reserved", "spent", "ids")}
    assert all(60_000 < ttl[name] <= 61_000 for name in ("win", "tok", "wtok"))
    assert all(599_000 < ttl[name] <= 600_000 for name in ("open", "cost", "reserved"))
    assert ttl["spent"] == ttl["ids"] == -1  # never: spend the ledger may not show yet
    assert redis_client.get(f"{limiter.prefix}{{3}}:spent") == b"12"


def test_a_reservation_unfinished_past_lost_after_is_released(redis_limiters):
    clock = FakeClock()
    limiter = redis_limiters(clock, lost_after_s=600)
    limits = Limits(rpm=None, tpm=None, budget_pico=1_000)
    lost = limiter.reserve(1, limits, 1, 1_000, 0)  # its process dies
    clock.now += 599.5
    with pytest.raises(RateLimited):  # held: the whole budget
        limiter.reserve(1, limits, 1, 50, 0)
    assert limiter.usage(1) == KeyUsage(0, 0, 1, 1_000, 0)
    clock.now += 0.5  # 600 s old: released
    assert limiter.usage(1) == KeyUsage(0, 0, 0, 0, 0)
    kept = limiter.reserve(1, limits, 1, 50, 0)
    limiter.finish(lost, 1, 900)  # too late: its cost comes with the ledger's figure
    limiter.finish(kept, 1, 50)
    assert limiter.usage(1) == KeyUsage(1, 1, 0, 0, 50)
    limiter.check_integrity()


def test_an_unreachable_redis_at_start_up_says_where_and_why():
    with pytest.raises(LimiterUnavailable, match=r"^the rate limiter's Redis at 127.0.0.1:1/0 is "
                                                 r"unavailable: Error 111 connecting"):
        RedisLimiter.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="Redis URL must specify one of the following schemes"):
        RedisLimiter.from_url("postgresql://127.0.0.1/0")


@pytest.fixture
def own_redis(tmp_path):
    """start() -> the URL of a redis-server of the test's own (on one port throughout), stop()
    to end it; the whole Redis goes down, as in an outage."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = []

    def start() -> str:
        running.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop() -> None:
        running[-1].terminate()
        running[-1].wait(10)

    yield start, stop
    for process in running:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_redis_down_mid_serving_is_limiter_unavailable_and_a_503(own_redis, caplog):
    start, stop = own_redis
    limiter = RedisLimiter.from_url(start(), clock=FakeClock())
    guarded = GuardedLimiter(limiter)
    limits = Limits(rpm=3, tpm=None, budget_pico=None)
    held = guarded.reserve(1, limits, 1, 5, 0)
    stop()
    began = time.monotonic()
    with pytest.raises(LimiterUnavailable, match=r"^the rate limiter's Redis at 127.0.0.1:\d+/0 "
                                                 r"is unavailable: "):
        limiter.reserve(1, limits, 1, 0, 0)
    with pytest.raises(LimiterUnavailable):
        limiter.finish(held, 1, 5)
    caplog.set_level(logging.INFO, logger="tokenmill.server.state")
    for _ in range(2):  # the server's side: a 503, never a 500; the outage logged once
        with pytest.raises(APIError) as refused:
            guarded.reserve(1, limits, 1, 0, 0)
        assert (refused.value.status, refused.value.code) == (503, "limiter_unavailable")
        assert refused.value.headers == {"Retry-After": "1"}
        guarded.finish(held, 1, 5)  # the request is over: its client sees no error for it
        assert guarded.headers(1, limits) == {}
    assert time.monotonic() - began < 5  # no call waits for a Redis that is gone
    start()  # back, empty (nothing was saved)
    assert guarded.reserve(1, limits, 1, 0, 0).id == 1
    assert guarded.headers(1, limits)["x-ratelimit-remaining-requests"] == "2"
    assert [r.getMessage().split(":")[0] for r in caplog.records
            if r.name == "tokenmill.server.state"] == [
        "the rate limiter is unreachable, refusing requests", "the rate limiter is reachable again"]
