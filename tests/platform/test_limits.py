"""Both limiters, in-process and Redis (`new_limiter`, tests/platform/conftest.py): exact
admissions, Retry-After and headers on a fake clock, atomicity under threads released at once,
and a state machine of reserve / finish / abort / retry / time."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant, multiple,
                                 rule, run_state_machine_as_test)

from tokenmill.platform.limits import KeyUsage, Limits, RateLimited, format_duration


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limiter_at(new_limiter):
    """limiter_at(now) -> (a fresh limiter of the backend under test, its fake clock at now)"""

    def make(now: float = 1000.0):
        clock = FakeClock(now)
        return new_limiter(clock), clock

    return make


def simultaneous(n: int, call) -> list:
    """Run `call()` on n threads released together by a barrier; each result or RateLimited."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except RateLimited as refused:
            results[i] = refused

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def refusals(results: list) -> list[RateLimited]:
    return [r for r in results if isinstance(r, RateLimited)]


def test_of_12_simultaneous_requests_against_rpm_5_exactly_5_pass_and_7_get_retry_after_60(
        limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=5, tpm=None, budget_pico=None)
    results = simultaneous(12, lambda: limiter.reserve(7, limits, 10, 0, 0))
    refused = refusals(results)
    assert len(refused) == 7
    assert sorted(r.id for r in results if r not in refused) == [1, 2, 3, 4, 5]
    assert {r.code for r in refused} == {"rate_limit_exceeded"}
    assert {r.retry_after_s for r in refused} == {60}
    assert refused[0].headers == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s", "retry-after": "60"}
    assert refused[0].message == ("Rate limit reached for requests per min (RPM): Limit 5, "
                                  "Used 5, Requested 1. Please try again in 1m0s.")
    assert limiter.usage(7) == KeyUsage(requests=5, tokens=50, open=5, reserved_pico=0,
                                        spent_pico=0)


def test_of_12_simultaneous_requests_of_100_tokens_against_tpm_500_exactly_5_pass(limiter_at):
    limiter, clock = limiter_at()
    limits = Limits(rpm=None, tpm=500, budget_pico=None)
    results = simultaneous(12, lambda: limiter.reserve(1, limits, 100, 0, 0))
    refused = refusals(results)
    assert len(refused) == 7
    assert {(r.code, r.retry_after_s) for r in refused} == {("rate_limit_exceeded", 60)}
    assert refused[0].headers == {
        "x-ratelimit-limit-tokens": "500", "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m0s", "retry-after": "60"}
    # two requests end having used 30 and 0 tokens: 170 tokens come free at once
    admitted = [r for r in results if r not in refused]
    clock.now += 10
    limiter.finish(admitted[0], 30, 0)
    limiter.finish(admitted[1], 0, 0)
    assert limiter.usage(1).tokens == 330
    assert limiter.reserve(1, limits, 170, 0, 0).tokens == 170
    with pytest.raises(RateLimited) as refused_one:
        limiter.reserve(1, limits, 1, 0, 0)
    # tokens come free when the requests admitted at 1000 leave at 1060: 50 s from now
    assert refused_one.value.retry_after_s == 50


def test_a_request_is_admitted_again_exactly_when_the_window_slides_past_the_last(limiter_at):
    limiter, clock = limiter_at(1000.0)
    limits = Limits(rpm=2, tpm=None, budget_pico=None)
    limiter.reserve(1, limits, 1, 0, 0)
    clock.now = 1015.5
    limiter.reserve(1, limits, 1, 0, 0)
    clock.now = 1059.9
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, limits, 1, 0, 0)
    assert refused.value.retry_after_s == 1  # 0.1 s, rounded up to a whole second
    assert refused.value.message.endswith("Please try again in 100ms.")
    clock.now = 1060.0  # the first request is 60 s old: out of (now - 60 s, now]
    assert limiter.reserve(1, limits, 1, 0, 0).request_ts == 1060.0
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, limits, 1, 0, 0)
    assert refused.value.retry_after_s == 16  # the 1015.5 request leaves at 1075.5
    clock.now = 1075.5
    limiter.reserve(1, limits, 1, 0, 0)
    assert limiter.usage(1).requests == 2


def test_keys_are_limited_apart(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=1, tpm=None, budget_pico=None)
    limiter.reserve(1, limits, 1, 0, 0)
    limiter.reserve(2, limits, 1, 0, 0)
    with pytest.raises(RateLimited):
        limiter.reserve(1, limits, 1, 0, 0)


def test_a_request_larger_than_tpm_is_refused_without_retry_after(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=100, budget_pico=None)
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, limits, 101, 0, 0)
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.retry_after_s is None
    assert refused.value.headers == {
        "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "0s"}
    assert limiter.usage(1) == KeyUsage(0, 0, 0, 0, 0)


def test_over_rpm_and_tpm_retry_after_is_the_later_of_the_two(limiter_at):
    limiter, clock = limiter_at(0.0)
    limits = Limits(rpm=2, tpm=100, budget_pico=None)
    limiter.reserve(1, limits, 60, 0, 0)
    clock.now = 20.0
    limiter.reserve(1, limits, 30, 0, 0)
    clock.now = 30.0
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, limits, 80, 0, 0)
    # rpm frees at 60 (first leaves); 80 tokens need both gone: at 80
    assert refused.value.retry_after_s == 50
    assert refused.value.message == (
        "Rate limit reached for requests per min (RPM): Limit 2, Used 2, Requested 1 and "
        "tokens per min (TPM): Limit 100, Used 90, Requested 80. Please try again in 50s.")


def test_a_tiny_budget_gives_one_success_then_insufficient_quota(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=None, budget_pico=1_000)
    first = limiter.reserve(1, limits, 50, 4_000, 0)  # its reservation alone exceeds the budget
    limiter.finish(first, 20, 1_600)
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, limits, 50, 4_000, 1_600)
    assert refused.value.code == "insufficient_quota"
    assert refused.value.retry_after_s is None
    assert refused.value.headers == {}
    assert refused.value.message == (
        "You exceeded your current quota: this key's budget is USD 0.000000001 and it has spent "
        "USD 0.0000000016 with USD 0 reserved by requests in flight.")
    assert limiter.usage(1) == KeyUsage(1, 20, 0, 0, 1_600)


def test_budget_counts_reservations_in_flight_and_admits_while_below(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=None, budget_pico=1_000)
    a = limiter.reserve(1, limits, 1, 600, 0)
    limiter.reserve(1, limits, 1, 399, 0)  # 600 < 1000
    limiter.reserve(1, limits, 1, 1, 0)  # 999 < 1000
    with pytest.raises(RateLimited) as refused:  # 1000 reaches it
        limiter.reserve(1, limits, 1, 0, 0)
    assert refused.value.code == "insufficient_quota"
    limiter.finish(a, 1, 100)  # 100 spent, 400 reserved: 500 < 1000
    assert limiter.usage(1) == KeyUsage(3, 3, 2, 400, 100)
    limiter.reserve(1, limits, 1, 0, 100)


def test_a_budget_of_zero_admits_nothing(limiter_at):
    limiter, _ = limiter_at()
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(1, Limits(None, None, 0), 1, 0, 0)
    assert refused.value.code == "insufficient_quota"


def test_concurrent_requests_overshoot_a_budget_by_less_than_one_reservation(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=None, budget_pico=250)
    results = simultaneous(12, lambda: limiter.reserve(1, limits, 10, 100, 0))
    admitted = [r for r in results if not isinstance(r, RateLimited)]
    assert len(admitted) == 3  # reserved 0, 100, 200 < 250 when each was admitted
    assert {r.code for r in refusals(results)} == {"insufficient_quota"}
    for reservation in admitted:  # each costs all it reserved
        limiter.finish(reservation, 10, 100)
    assert limiter.usage(1).spent_pico == 300  # 250 + 50: under one reservation (100) over


def test_a_stale_ledger_read_cannot_hide_a_cost_finished_since(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=None, budget_pico=1_000)
    a = limiter.reserve(1, limits, 1, 900, 0)
    b = limiter.reserve(1, limits, 1, 50, 0)
    limiter.finish(a, 1, 900)  # written to the ledger, then finished
    # the caller read the ledger before `a` was written: it says 0 spent
    limiter.reserve(1, limits, 1, 60, 0)  # 900 spent + 50 reserved < 1000
    with pytest.raises(RateLimited):  # 900 + 110 >= 1000: the ledger's 0 would have admitted it
        limiter.reserve(1, limits, 1, 60, 0)
    limiter.finish(b, 1, 60)
    assert limiter.usage(1).spent_pico == 960


def test_a_ledger_read_holding_an_unfinished_requests_cost_does_not_count_it_twice(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=None, budget_pico=1_000)
    a = limiter.reserve(1, limits, 1, 500, 0)
    # `a` is in the ledger (400) but not yet finished when the next caller reads the ledger
    b = limiter.reserve(1, limits, 1, 100, 400)
    limiter.finish(a, 1, 400)
    limiter.finish(b, 1, 100)
    assert limiter.usage(1).spent_pico == 500
    limiter.reserve(1, limits, 1, 100, 500)


def test_an_idle_key_takes_spend_others_recorded_from_the_ledger(limiter_at):
    limiter, _ = limiter_at()
    limits = Limits(rpm=None, tpm=None, budget_pico=1_000)
    limiter.finish(limiter.reserve(1, limits, 1, 10, 0), 1, 10)
    with pytest.raises(RateLimited):
        limiter.reserve(1, limits, 1, 10, 1_000)  # another process spent the rest
    assert limiter.usage(1).spent_pico == 10  # a refusal changes nothing


def test_finish_is_idempotent(limiter_at):
    limiter, clock = limiter_at()
    limits = Limits(rpm=3, tpm=100, budget_pico=1_000)
    r = limiter.reserve(1, limits, 40, 500, 0)
    clock.now += 1
    limiter.finish(r, 25, 300)
    once = limiter.usage(1)
    limiter.finish(r, 25, 300)
    limiter.finish(r, 0, 0)
    assert limiter.usage(1) == once == KeyUsage(1, 25, 0, 0, 300)


def test_finish_after_the_window_passed_releases_only_the_budget(limiter_at):
    limiter, clock = limiter_at()
    limits = Limits(rpm=1, tpm=100, budget_pico=1_000)
    r = limiter.reserve(1, limits, 100, 500, 0)
    clock.now += 90
    assert limiter.usage(1) == KeyUsage(0, 0, 1, 500, 0)
    limiter.finish(r, 80, 200)
    assert limiter.usage(1) == KeyUsage(0, 0, 0, 0, 200)
    limiter.check_integrity()


def test_headers_exact_values_and_formats(limiter_at):
    limiter, clock = limiter_at(0.0)
    limits = Limits(rpm=10, tpm=1000, budget_pico=None)
    assert limiter.headers(1, limits) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "0s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0s"}
    limiter.reserve(1, limits, 300, 0, 0)
    clock.now = 12.5
    second = limiter.reserve(1, limits, 200, 0, 0)
    clock.now = 14.98
    assert limiter.headers(1, limits) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "8",
        "x-ratelimit-reset-requests": "57.52s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "57.52s"}
    limiter.finish(second, 0, 0)  # it used no tokens: tokens reset with the first request
    assert limiter.headers(1, limits)["x-ratelimit-reset-tokens"] == "45.02s"
    assert limiter.headers(1, limits)["x-ratelimit-remaining-tokens"] == "700"
    clock.now = 72.48
    assert limiter.headers(1, limits)["x-ratelimit-reset-requests"] == "20ms"
    assert limiter.headers(1, Limits(None, None, 5)) == {}


def test_reserve_with_headers_gives_the_headers_a_reserve_then_headers_would(limiter_at):
    """One call (one Redis round trip) or two, the admitted response carries the same headers,
    a request reserving no tokens included (tokens then reset with an older one)."""
    one, clock = limiter_at(0.0)
    two, twin_clock = limiter_at(0.0)
    for key_id, limits in enumerate([Limits(10, 1000, None), Limits(10, None, None),
                                     Limits(None, 1000, 10**9), Limits(None, None, None)]):
        for now, tokens in ((1.0, 300), (2.5, 0), (4.25, 120)):
            clock.now = twin_clock.now = now
            reservation, headers = one.reserve_with_headers(key_id, limits, tokens, 7, 0)
            assert (reservation.tokens, reservation.cost_pico, reservation.request_ts) == (
                tokens, 7, now)
            two.reserve(key_id, limits, tokens, 7, 0)
            assert headers == two.headers(key_id, limits)
        if key_id == 0:
            assert headers == {
                "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "7",
                "x-ratelimit-reset-requests": "1m0s", "x-ratelimit-limit-tokens": "1000",
                "x-ratelimit-remaining-tokens": "580", "x-ratelimit-reset-tokens": "1m0s"}
    with pytest.raises(RateLimited):
        one.reserve_with_headers(0, Limits(3, None, None), 1, 0, 0)
    one.check_integrity()


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (-3, "0s"), (0.02, "20ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"),
    (59.999, "59.999s"), (360, "6m0s"), (61.25, "1m1.25s"), (3723, "1h2m3s"), (3600, "1h0m0s")])
def test_format_duration_writes_go_style_durations(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("limits", [
    dict(rpm=0, tpm=None, budget_pico=None), dict(rpm=None, tpm=-1, budget_pico=None),
    dict(rpm=None, tpm=None, budget_pico=-1), dict(rpm=1.5, tpm=None, budget_pico=None)])
def test_limits_reject_values_that_are_no_limit(limits):
    with pytest.raises(ValueError):
        Limits(**limits)


def test_negative_counts_are_refused(limiter_at):
    limiter, _ = limiter_at()
    with pytest.raises(ValueError):
        limiter.reserve(1, Limits(None, None, None), -1, 0, 0)
    r = limiter.reserve(1, Limits(None, None, None), 1, 0, 0)
    with pytest.raises(ValueError):
        limiter.finish(r, 1, -5)


KEY = 3


class LimiterMachine(RuleBasedStateMachine):
    """A model predicts every admission exactly; invariants hold after every step."""

    reservations = Bundle("reservations")

    def __init__(self, new_limiter) -> None:
        super().__init__()
        self.new_limiter = new_limiter

    @initialize(rpm=st.none() | st.integers(1, 4), tpm=st.none() | st.integers(1, 400),
                budget=st.none() | st.integers(0, 2_000))
    def setup(self, rpm, tpm, budget):
        self.clock = FakeClock(0.0)
        self.limiter = self.new_limiter(self.clock)
        self.limits = Limits(rpm, tpm, budget)
        self.admitted: dict[int, list] = {}  # id -> [ts, tokens counted]
        self.unfinished: dict[int, int] = {}  # id -> reserved cost
        self.spent = 0  # the ledger: true costs of finished requests
        self.reserved_costs: list[int] = []  # cost_pico of every admitted reservation

    def window(self) -> list[list]:
        return [a for a in self.admitted.values() if self.clock.now - a[0] < 60]

    def expected_refusal(self, tokens: int) -> str | None:
        window = self.window()
        if (self.limits.budget_pico is not None
                and self.spent + sum(self.unfinished.values()) >= self.limits.budget_pico):
            return "insufficient_quota"
        if self.limits.rpm is not None and len(window) >= self.limits.rpm:
            return "rate_limit_exceeded"
        if self.limits.tpm is not None and sum(a[1] for a in window) + tokens > self.limits.tpm:
            return "rate_limit_exceeded"
        return None

    @rule(target=reservations, tokens=st.integers(0, 200), cost=st.integers(0, 600),
          stale=st.booleans())
    def reserve(self, tokens, cost, stale):
        expected = self.expected_refusal(tokens)
        before = self.limiter.usage(KEY)
        ledger = 0 if stale else self.spent  # a stale read may miss every finished cost
        try:
            r = self.limiter.reserve(KEY, self.limits, tokens, cost, ledger)
        except RateLimited as refused:
            assert refused.code == expected
            assert self.limiter.usage(KEY) == before
            return multiple()
        assert expected is None
        self.admitted[r.id] = [self.clock.now, tokens]
        self.unfinished[r.id] = cost
        self.reserved_costs.append(cost)
        return r

    def end(self, r, fraction):
        tokens = r.tokens * fraction // 4
        cost = r.cost_pico * fraction // 4
        if r.id in self.unfinished:
            del self.unfinished[r.id]
            self.spent += cost
            if self.clock.now - self.admitted[r.id][0] < 60:
                self.admitted[r.id][1] = tokens
            self.limiter.finish(r, tokens, cost)
        else:
            before = self.limiter.usage(KEY)
            self.limiter.finish(r, tokens, cost)
            assert self.limiter.usage(KEY) == before

    @rule(r=reservations)
    def finish(self, r):
        self.end(r, 4)

    @rule(r=reservations, fraction=st.integers(0, 3))
    def abort(self, r, fraction):  # billed for the tokens produced so far
        self.end(r, fraction)

    @rule(r=reservations, fraction=st.integers(0, 4))
    def retry(self, r, fraction):  # a second finish, as from a retried cleanup, changes nothing
        self.end(r, fraction)
        self.end(r, fraction)

    @rule(dt=st.sampled_from([0.5, 1, 7.25, 30, 59.5, 60, 61]))
    def advance(self, dt):
        self.clock.now += dt

    @invariant()
    def counts_match_the_model(self):
        self.limiter.check_integrity()
        usage = self.limiter.usage(KEY)
        window = self.window()
        assert usage == KeyUsage(len(window), sum(a[1] for a in window), len(self.unfinished),
                                 sum(self.unfinished.values()), self.spent)
        assert min(usage.requests, usage.tokens, usage.reserved_pico, usage.spent_pico) >= 0

    @invariant()
    def remaining_is_within_zero_and_the_limit(self):
        headers = self.limiter.headers(KEY, self.limits)
        for kind, limit in (("requests", self.limits.rpm), ("tokens", self.limits.tpm)):
            if limit is not None:
                assert 0 <= int(headers[f"x-ratelimit-remaining-{kind}"]) <= limit

    @invariant()
    def no_60s_span_holds_more_than_rpm_admissions(self):
        if self.limits.rpm is None:
            return
        times = sorted(a[0] for a in self.admitted.values())
        for start in times:
            assert sum(start <= t < start + 60 for t in times) <= self.limits.rpm

    @invariant()
    def spend_stays_under_budget_plus_one_reservation(self):
        if self.limits.budget_pico is None or not self.admitted:
            return
        largest = max(self.reserved_costs)
        assert self.spent + sum(self.unfinished.values()) < self.limits.budget_pico + largest


def test_the_machine_predicts_every_admission_and_keeps_the_invariants(new_limiter):
    run_state_machine_as_test(lambda: LimiterMachine(new_limiter),
                              settings=settings(max_examples=150, stateful_step_count=40,
                                                deadline=None))
