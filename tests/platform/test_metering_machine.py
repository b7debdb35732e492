"""The usage ledger and the rate limiter together, as the server uses them: a hypothesis state
machine drives the server's own `Metering` (reserve, bill, release_unbilled) through sequences of
admissions, completions, aborts, errors, retried bills, unused reservations given back, rows that
another replica writes and clock steps, over several keys, on SQLite and PostgreSQL.

Claimed after every step, against a model of what was admitted and billed:
- each billed response id has exactly one ledger row, holding its first bill's counts and cost: a
  retried bill adds no row, changes no spend and hands no reservation back twice;
- per key, the rows' costs sum to `Ledger.spend`, to `Ledger.query`'s total and to
  `Ledger.totals` (by key, by model and by UTC day), and to what the model billed;
- the limiter holds exactly the cost reservations of the open (unbilled) requests, counts each
  admitted request in its 60 s window with its reserved tokens until it is billed and its true
  tokens after, and knows exactly the spend billed through it plus what it last read from the
  ledger while idle: an idle key with no other replica's spend unseen has limiter spend == ledger
  spend;
- admission is predicted exactly (a 429 `insufficient_quota` or `rate_limit_exceeded`), and a
  refusal changes nothing;
- what a key spends through this server stays below its budget plus its largest reservation;
- `InProcessLimiter.check_integrity` holds.

Real: `Metering`, `Ledger` over the `store` fixture's database, `InProcessLimiter` (on a fake
clock, put in `ServerState.limiter`), keys and principals from `KeyService`, `Job`,
`SamplingParams`, `ServedModel` with a catalog `Price`, `UsageTally` fed `RequestOutput`s, and
starlette's `State`. Stand-ins: the engine (only needed to build a `ServedModel`; nothing calls
it) and the request, an object whose `.state` is all `Metering` reads.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 multiple, rule, run_state_machine_as_test)
from starlette.datastructures import State

from tokenmill.catalog.catalog import CatalogEntry, ModelSource
from tokenmill.catalog.pricing import Price
from tokenmill.engine.outputs import RequestOutput
from tokenmill.platform.keys import KeyService, Principal
from tokenmill.platform.ledger import MAX_PAGE, STATUSES, Ledger, UsageEntry, UsageTotals
from tokenmill.platform.limits import WINDOW_S, InProcessLimiter, KeyUsage, Limits
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metering import Metering
from tokenmill.server.models import ServedModel
from tokenmill.server.serving import Job
from tokenmill.server.state import ServerSettings, ServerState
from tokenmill.server.usage import UsageTally

# Micro-USD per 1M tokens, i.e. picodollars per token. Cached prompt tokens never cost more than
# uncached ones, so the reservation (every prompt token uncached, every choice at max_tokens) is
# the most a request can cost.
PRICES = {"m/cached": Price(input=3, output=5, cached_input=1),
          "m/flat": Price(input=2, output=2),
          "m/free": Price(input=0, output=0)}
CHOICES = 4  # at most 2 prompts x n = 2
DAY = timedelta(days=1)
# Each example dates its rows from its own day, 20 minutes before midnight UTC (so its rows fall
# on two days): see `MeteringMachine.__init__`.
T0 = datetime(2027, 3, 1, 23, 40, tzinfo=timezone.utc)
EXAMPLES = itertools.count()
NOT_COMPARED = datetime(2000, 1, 1, tzinfo=timezone.utc)  # finished_at: Metering's wall clock


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def served(model_id: str) -> ServedModel:
    """A served model priced from PRICES; its engine is never called by Metering."""
    entry = CatalogEntry(id=model_id, name=model_id, summary="", card="", family="llama",
                         template=None, context_length=4096, price=PRICES[model_id],
                         source=ModelSource(path="/nonexistent"), hardware="")
    return ServedModel(id=model_id, engine=SimpleNamespace(tokenizer=SimpleNamespace()),
                       entry=entry)


MODELS = {model_id: served(model_id) for model_id in PRICES}


def cost_of(price: Price, prompt: int, cached: int, completion: int) -> int:
    """The model's own price arithmetic: cached prompt tokens at the cached price if there is
    one, the rest of the prompt at the input price, completion at the output price."""
    cached_price = price.input if price.cached_input is None else price.cached_input
    return (prompt - cached) * price.input + cached * cached_price + completion * price.output


@dataclass(eq=False)
class Account:
    """One key and what the model expects of it."""

    key_id: int
    limits: Limits
    principal: Principal  # as `KeyService.authenticate` resolved it
    admitted: list[list] = field(default_factory=list)  # [admitted at, tokens counted] each
    open: dict[str, Pending] = field(default_factory=dict)  # admitted, not billed nor released
    spend: int = 0  # the ledger: every row's cost, this server's and other replicas'
    foreign: int = 0  # of `spend`, what other replicas wrote
    unseen: int = 0  # of `foreign`, what the limiter has not read from the ledger yet
    largest: int | None = None  # the largest cost reservation admitted

    @property
    def reserved(self) -> int:
        return sum(p.cost for p in self.open.values())


@dataclass(eq=False)
class Pending:
    """An admitted request: its job, its request stand-in and what it reserved."""

    id: str  # the response id
    account: Account
    job: Job
    raw: SimpleNamespace  # `.state`: the principal, then Metering's reservation and billing flag
    arrival: datetime  # timing["arrival"]: the row's created_at
    entry: list  # its [admitted at, tokens counted] in account.admitted
    tokens: int  # reserved against tpm
    cost: int  # reserved against the budget
    state: str = "open"  # open | billed | released


def request_stand_in(principal: Principal) -> SimpleNamespace:
    return SimpleNamespace(state=State({"principal": principal}))


# (rpm, tpm, budget_pico); about one budget in ten is 0, which admits nothing
limits_strategy = st.tuples(st.none() | st.integers(1, 5), st.none() | st.integers(50, 500),
                            st.none() | st.integers(-400, 4000).map(lambda b: max(b, 0)))
fractions = st.lists(st.integers(0, 4), min_size=CHOICES, max_size=CHOICES)  # of max_tokens
partial = st.lists(st.none() | st.integers(0, 3), min_size=CHOICES, max_size=CHOICES)  # None:
# that choice produced no output before the request ended
cached_fractions = st.lists(st.integers(0, 4), min_size=2, max_size=2)  # of each prompt
# Every step happens this many seconds after the one before (the fake clock's step): mostly at
# once, sometimes just inside or past the 60 s window of earlier requests.
LATER = st.sampled_from([0, 0, 0, 0.5, 7.25, 30, 59.5, 60, 61, 125])


class MeteringMachine(RuleBasedStateMachine):
    """One server process (Metering, its limiter) over a store shared with other replicas.

    The store is opened once per test function (migrating a fresh one per example would cost
    most of the run); examples stay apart because each creates its own keys and dates its rows
    in its own day, so every query here (by key, or created in [base, base + 1 day)) sees only
    the example's own rows. An example's clock runs at most 30 steps x 125 s, well under a day.
    """

    requests = Bundle("requests")  # admitted, neither billed nor given back
    billed = Bundle("billed")

    def __init__(self, store) -> None:
        super().__init__()
        self.ledger = Ledger(store)
        self.keys = KeyService(store)
        self.clock = FakeClock(0.0)
        server_settings = ServerSettings(keys=self.keys, ledger=self.ledger)
        self.server = ServerState(server_settings)
        self.server.limiter = InProcessLimiter(self.clock)
        self.limiter = self.server.limiter
        self.metering = Metering(server_settings, self.server)
        self.loop = asyncio.new_event_loop()
        self.run_id = uuid.uuid4().hex[:12]
        self.base = T0 + next(EXAMPLES) * DAY
        self.accounts: list[Account] = []
        self.rows: dict[str, UsageEntry] = {}  # expected, finished_at NOT_COMPARED
        self.serial = itertools.count()

    def teardown(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def now(self) -> datetime:
        return self.base + timedelta(seconds=self.clock.now)

    def window(self, account: Account) -> list[list]:
        return [e for e in account.admitted if self.clock.now - e[0] < WINDOW_S]

    def account(self, who: int) -> Account:
        return self.accounts[who % len(self.accounts)]

    # ---- keys ---------------------------------------------------------------------------------

    @initialize(limits=st.lists(limits_strategy, min_size=1, max_size=2))
    def create_keys(self, limits):
        for i, (rpm, tpm, budget) in enumerate(limits):
            key, _ = self.keys.create(f"metering-{self.run_id}-{i}", rpm=rpm, tpm=tpm,
                                      budget_usd=None if budget is None
                                      else Decimal(budget).scaleb(-12))
            principal = self.keys.authenticate(key)
            assert (principal.rpm, principal.tpm, principal.budget_pico) == (rpm, tpm, budget)
            self.accounts.append(Account(principal.key_id, Limits(rpm, tpm, budget), principal))

    # ---- admission ----------------------------------------------------------------------------

    def expected_refusal(self, account: Account, tokens: int) -> str | None:
        """The budget first (against the spend the limiter knows while the key is busy, the
        ledger's while it is idle), then rpm and tpm over the last 60 s."""
        limits = account.limits
        if limits.budget_pico is not None:
            spent = account.spend - account.unseen if account.open else account.spend
            if spent + account.reserved >= limits.budget_pico:
                return "insufficient_quota"
        window = self.window(account)
        if limits.rpm is not None and len(window) >= limits.rpm:
            return "rate_limit_exceeded"
        if limits.tpm is not None and sum(e[1] for e in window) + tokens > limits.tpm:
            return "rate_limit_exceeded"  # a request larger than tpm included
        return None

    @rule(target=requests, later=LATER, who=st.integers(0, 1),
          model=st.sampled_from(sorted(MODELS)),
          prompt_lens=st.lists(st.integers(1, 12), min_size=1, max_size=2), n=st.integers(1, 2),
          max_tokens=st.integers(1, 24))
    def reserve(self, later, who, model, prompt_lens, n, max_tokens):
        self.clock.now += later
        account = self.account(who)
        job = Job(MODELS[model], [list(range(3, 3 + k)) for k in prompt_lens],
                  SamplingParams(n=n, max_tokens=max_tokens), [""] * len(prompt_lens))
        most = len(prompt_lens) * n * max_tokens  # completion tokens at most
        tokens = sum(prompt_lens) + most
        cost = cost_of(PRICES[model], sum(prompt_lens), 0, most)
        raw = request_stand_in(account.principal)
        expected = self.expected_refusal(account, tokens)
        before = self.limiter.usage(account.key_id)
        try:
            headers = self.run(self.metering.reserve(job, raw))
        except APIError as refused:
            assert (refused.status, refused.code) == (429, expected)
            # a refusal changes nothing: the limiter as it was, no reservation kept
            assert self.limiter.usage(account.key_id) == before
            assert getattr(raw.state, "reservation", None) is None
            return multiple()
        assert expected is None
        reservation = raw.state.reservation
        assert (reservation.key_id, reservation.tokens, reservation.cost_pico,
                reservation.request_ts) == (account.key_id, tokens, cost, self.clock.now)
        if account.limits.budget_pico is not None and not account.open:
            account.unseen = 0  # an idle key takes the ledger's figure, other replicas' included
        pending = Pending(f"cmpl-{self.run_id}-{next(self.serial)}", account, job, raw,
                          self.now(), [self.clock.now, tokens], tokens, cost)
        account.admitted.append(pending.entry)
        account.open[pending.id] = pending
        account.largest = cost if account.largest is None else max(account.largest, cost)
        window = self.window(account)
        if account.limits.rpm is not None:
            assert headers["x-ratelimit-remaining-requests"] == str(
                account.limits.rpm - len(window))
        if account.limits.tpm is not None:
            assert headers["x-ratelimit-remaining-tokens"] == str(
                account.limits.tpm - sum(e[1] for e in window))
        return pending

    # ---- billing ------------------------------------------------------------------------------

    def outputs(self, pending: Pending, produced: list, cached: list, completed: bool):
        """The engine's outputs for `pending`: per choice with a fraction in `produced`, a halfway
        output then its last, interleaved across choices (cumulative counts, as the engine
        reports them). Returns them, the last choice's finish reason and the expected (prompt,
        cached, completion) counts."""
        job = pending.job
        n, max_tokens = job.params.n, job.params.max_tokens
        ids = [pending.id] if len(job.prompts) == 1 else \
            [f"{pending.id}-{p}" for p in range(len(job.prompts))]
        halfway, last, finish = [], [], None
        prompt = cached_total = completion = 0
        for p, prompt_ids in enumerate(job.prompts):
            in_cache = len(prompt_ids) * cached[p] // 4
            started = [i for i in range(n) if produced[job.choice(p, i)] is not None]
            if started:
                prompt += len(prompt_ids)  # the engine request reported its prompt
            if 0 in started:
                cached_total += in_cache  # a prompt's cached tokens are its first choice's
            for i in started:
                made = max_tokens * produced[job.choice(p, i)] // 4
                completion += made
                finish = ("length" if made == max_tokens else "stop") if completed else None

                def output(count, reason, i=i, p=p):
                    return RequestOutput(ids[p], i, [5] * count, "", [], reason, None,
                                         len(prompt_ids), in_cache, count)

                halfway.append(output(made // 2, None))
                last.append(output(made, finish))
        return halfway + last, finish, (prompt, cached_total, completion)

    def bill(self, pending: Pending, status: str, produced: list, cached: list) -> None:
        outputs, finish, (prompt, cached_total, completion) = self.outputs(
            pending, produced, cached, status == "completed")
        tally = UsageTally()
        for out in outputs:
            tally.add(out)
        account, model = pending.account, pending.job.model
        cost = cost_of(model.entry.price, prompt, cached_total, completion)
        before = self.limiter.usage(account.key_id)
        self.run(self.metering.bill(pending.job, pending.id, pending.raw, tally, status, finish,
                                    {"arrival": pending.arrival}))
        if pending.state == "billed":
            # a retry: the first row stands (the invariants check it), nothing handed back twice
            assert self.limiter.usage(account.key_id) == before
            return
        # what a request uses never exceeds what it reserved
        assert prompt + completion <= pending.tokens and cost <= pending.cost
        pending.state = "billed"
        del account.open[pending.id]
        account.spend += cost
        if self.clock.now - pending.entry[0] < WINDOW_S:
            pending.entry[1] = prompt + completion  # in its window with the tokens it used
        self.rows[pending.id] = UsageEntry(pending.id, account.key_id, model.id, prompt,
                                           cached_total, completion, cost, status, finish,
                                           pending.arrival, NOT_COMPARED)

    def close(self, pending: Pending) -> None:
        """The stream's on_close: gives an unbilled reservation back unused, and changes nothing
        for a request already billed."""
        account = pending.account
        before = self.limiter.usage(account.key_id)
        self.metering.release_unbilled(pending.raw)
        if pending.state == "billed":
            assert self.limiter.usage(account.key_id) == before
            return
        pending.state = "released"
        del account.open[pending.id]
        if self.clock.now - pending.entry[0] < WINDOW_S:
            pending.entry[1] = 0  # in its window with nothing used

    @rule(target=billed, later=LATER, pending=consumes(requests), produced=fractions,
          cached=cached_fractions)
    def complete(self, later, pending, produced, cached):
        self.clock.now += later
        self.bill(pending, "completed", produced, cached)
        return pending

    @rule(target=billed, later=LATER, pending=consumes(requests), produced=partial,
          cached=cached_fractions)
    def abort(self, later, pending, produced, cached):  # the client left: billed what it got
        self.clock.now += later
        self.bill(pending, "aborted", produced, cached)
        return pending

    @rule(target=billed, later=LATER, pending=consumes(requests), produced=partial,
          cached=cached_fractions)
    def fail(self, later, pending, produced, cached):  # the engine failed midway
        self.clock.now += later
        self.bill(pending, "error", produced, cached)
        return pending

    @rule(later=LATER, pending=billed, status=st.sampled_from(STATUSES), produced=fractions,
          cached=cached_fractions)
    def retry(self, later, pending, status, produced, cached):
        """Billed again, at any later time, with any status and counts (a retried write, a second
        exit path), then its stream's on_close: neither changes anything."""
        self.clock.now += later
        self.bill(pending, status, produced, cached)
        self.close(pending)

    @rule(later=LATER, pending=consumes(requests))
    def release_unused(self, later, pending):
        """A stream whose client left before its body started: never billed, its reservation
        given back unused by on_close. (Such a request never reaches `bill`.)"""
        self.clock.now += later
        self.close(pending)

    @rule(later=LATER, who=st.integers(0, 1), tokens=st.integers(0, 100))
    def another_replica_bills(self, later, who, tokens):
        """Another server process writes a row for this key (then retries it): this limiter
        learns of it only from the ledger, when the key is idle and has a budget."""
        self.clock.now += later
        account = self.account(who)
        rid = f"cmpl-{self.run_id}-replica-{next(self.serial)}"
        cost = cost_of(PRICES["m/flat"], 0, 0, tokens)
        entry = UsageEntry(rid, account.key_id, "m/flat", 0, 0, tokens, cost, "completed",
                           "stop", self.now(), self.now())
        assert self.ledger.record(entry) is True
        assert self.ledger.record(replace(entry, cost_pico=cost + 1)) is False
        self.rows[rid] = replace(entry, finished_at=NOT_COMPARED)
        account.spend += cost
        account.foreign += cost
        account.unseen += cost

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def each_billed_id_has_exactly_its_one_row(self):
        page = self.ledger.query(start=self.base, end=self.base + DAY, limit=MAX_PAGE)
        assert not page.has_more
        ids = [e.id for e in page.data]
        assert len(ids) == len(set(ids))
        assert {e.id: replace(e, finished_at=NOT_COMPARED) for e in page.data} == self.rows
        assert page.total_cost_pico == sum(e.cost_pico for e in self.rows.values())

    @invariant()
    def spend_and_totals_sum_the_rows(self):
        by_key, by_model, by_day = defaultdict(int), defaultdict(int), defaultdict(int)
        for e in self.rows.values():
            by_key[e.key_id] += e.cost_pico
            by_model[e.model] += e.cost_pico
            by_day[e.created_at.date().isoformat()] += e.cost_pico
        assert self.ledger.totals(start=self.base, end=self.base + DAY) == UsageTotals(
            dict(by_key), dict(by_model), dict(by_day))
        for account in self.accounts:
            assert self.ledger.spend(account.key_id) == by_key.get(account.key_id, 0) \
                == account.spend

    @invariant()
    def limiter_holds_exactly_the_open_reservations_and_the_known_spend(self):
        self.limiter.check_integrity()
        for account in self.accounts:
            window = self.window(account)
            usage = self.limiter.usage(account.key_id)
            assert usage == KeyUsage(len(window), sum(e[1] for e in window), len(account.open),
                                     account.reserved, account.spend - account.unseen)
            if not account.open and not account.unseen:
                assert usage.spent_pico == self.ledger.spend(account.key_id)

    @invariant()
    def spend_stays_below_budget_plus_the_largest_reservation(self):
        for account in self.accounts:
            budget = account.limits.budget_pico
            if budget is None or account.largest is None:
                continue
            through_here = account.spend - account.foreign
            assert through_here + account.reserved < budget + account.largest


MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_reserve_bill_abort_retry_and_release_keep_rows_spend_and_reservations_consistent(store):
    run_state_machine_as_test(lambda: MeteringMachine(store), settings=MACHINE_SETTINGS)
