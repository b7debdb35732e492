"""The usage ledger and the rate limiter together, as the server uses them: a hypothesis state
machine drives the server's own `Metering` (reserve, bill, release_unbilled) through sequences of
admissions, completions, aborts, errors, retried bills, unused reservations given back, rows that
another replica writes, a reservation racing another request's bill, and clock steps, over
several keys, on SQLite and PostgreSQL, with either limiter (in-process, or Redis).

Claimed after every step, against a model of what was admitted and billed:
- each billed response id has exactly one ledger row, holding its first bill's counts and cost: a
  retried bill adds no row, changes no spend and hands no reservation back twice;
- per key, the rows' costs sum to `Ledger.spend`, to `Ledger.query`'s total and to
  `Ledger.totals` (by key, by model and by UTC day), and to what the model billed;
- the limiter holds exactly the cost reservations of the open (unbilled) requests, and counts each
  admitted request in its 60 s window with its reserved tokens until it is billed and its true
  tokens after;
- the limiter's spend is exactly what the model predicts: every cost billed through it, plus the
  ledger figure it takes while the key is idle. It never misses a cost billed through this server
  nor counts more than the ledger holds, whichever way a reservation's ledger read and another
  request's bill interleave; with no other replica writing, it equals the ledger's spend;
- admission is predicted exactly (a 429 `insufficient_quota` or `rate_limit_exceeded`), and a
  refusal changes nothing;
- what a key spends through this server stays below its budget plus its largest reservation;
- the limiter's `check_integrity` holds.

Real: `Metering`, `Ledger` over the `store` fixture's database, the limiter (on a fake clock,
injected through `ServerSettings`), keys and principals from `KeyService`, `Job`,
`SamplingParams`, `ServedModel` with a catalog `Price`, `UsageTally` fed `RequestOutput`s, and
starlette's `State`. Stand-ins: the engine (only needed to build a `ServedModel`; nothing calls
it) and the request, an object whose `.state` is all `Metering` reads. The ledger is a `Ledger`
subclass that can run one action right after a read or a write, to force an interleaving.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from collections.abc import Callable
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
from tokenmill.platform.limits import WINDOW_S, KeyUsage, Limits
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
# on two days): see `MeteringMachine`.
T0 = datetime(2027, 3, 1, 23, 40, tzinfo=timezone.utc)
EXAMPLES = itertools.count()
NOT_COMPARED = datetime(2000, 1, 1, tzinfo=timezone.utc)  # finished_at: Metering's wall clock


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class HookedLedger(Ledger):
    """A `Ledger` that runs `after_spend` (`after_record`) once, in the worker thread, right
    after its next `spend` read (`record` write) and before returning to the caller."""

    after_spend: Callable[[], None] | None = None
    after_record: Callable[[], None] | None = None

    def spend(self, key_id: int) -> int:
        value = super().spend(key_id)
        hook, self.after_spend = self.after_spend, None
        if hook is not None:
            hook()
        return value

    def record(self, entry: UsageEntry) -> bool:
        wrote = super().record(entry)
        hook, self.after_record = self.after_record, None
        if hook is not None:
            hook()
        return wrote


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


def request_stand_in(principal: Principal) -> SimpleNamespace:
    return SimpleNamespace(state=State({"principal": principal}))


@dataclass(eq=False)
class Account:
    """One key and what the model expects of it."""

    key_id: int
    limits: Limits
    principal: Principal  # as `KeyService.authenticate` resolved it
    admitted: list[list] = field(default_factory=list)  # [admitted at, tokens counted] each
    open: dict[str, Pending] = field(default_factory=dict)  # admitted, not billed nor released
    spend: int = 0  # the ledger: every row's cost, this server's and other replicas'
    local: int = 0  # of `spend`, what this server billed
    known: int = 0  # the limiter's spend: billed through it, or read from the ledger while idle
    largest: int | None = None  # the largest cost reservation admitted

    @property
    def reserved(self) -> int:
        return sum(p.cost for p in self.open.values())


@dataclass(eq=False)
class Request:
    """A request as it reaches `Metering.reserve`, and what it will reserve."""

    account: Account
    job: Job
    raw: SimpleNamespace  # `.state`: the principal, then Metering's reservation and billing flag
    tokens: int  # prompt + n x max_tokens per prompt
    cost: int  # its price with every prompt token uncached and every choice at max_tokens


@dataclass(eq=False)
class Pending:
    """An admitted request."""

    id: str  # the response id
    request: Request
    arrival: datetime  # timing["arrival"]: the row's created_at
    entry: list  # its [admitted at, tokens counted] in account.admitted
    state: str = "open"  # open | billed | released

    @property
    def account(self) -> Account:
        return self.request.account

    @property
    def cost(self) -> int:
        return self.request.cost


@dataclass(frozen=True)
class Bill:
    """One bill of a request: what Metering.bill is given and what the model expects of it."""

    tally: UsageTally
    status: str
    finish_reason: str | None
    prompt: int
    cached: int
    completion: int
    cost: int


# (rpm, tpm, budget_pico); about one budget in ten is 0, which admits nothing
limits_strategy = st.tuples(st.none() | st.integers(1, 5), st.none() | st.integers(50, 500),
                            st.none() | st.integers(-400, 4000).map(lambda b: max(b, 0)))
request_strategy = st.fixed_dictionaries({
    "model": st.sampled_from(sorted(MODELS)),
    "prompt_lens": st.lists(st.integers(1, 12), min_size=1, max_size=2),
    "n": st.integers(1, 2),
    "max_tokens": st.integers(1, 24)})
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

    def __init__(self, store, new_limiter) -> None:
        super().__init__()
        self.ledger = HookedLedger(store)
        self.keys = KeyService(store)
        self.clock = FakeClock(0.0)
        self.limiter = new_limiter(self.clock)
        server_settings = ServerSettings(keys=self.keys, ledger=self.ledger, limiter=self.limiter)
        self.server = ServerState(server_settings)
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

    def run_from_worker(self, coroutine):
        """Run `coroutine` on the machine's loop from a worker thread (a ledger hook), waiting."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

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

    # ---- admission: the model ------------------------------------------------------------------

    def request(self, account: Account, model: str, prompt_lens: list[int], n: int,
                max_tokens: int) -> Request:
        job = Job(MODELS[model], [list(range(3, 3 + k)) for k in prompt_lens],
                  SamplingParams(n=n, max_tokens=max_tokens), [""] * len(prompt_lens))
        most = len(prompt_lens) * n * max_tokens  # completion tokens at most
        return Request(account, job, request_stand_in(account.principal),
                       sum(prompt_lens) + most,
                       cost_of(PRICES[model], sum(prompt_lens), 0, most))

    def ledger_read(self, account: Account) -> int | None:
        """The spend Metering reads from the ledger now: none without a budget."""
        return None if account.limits.budget_pico is None else account.spend

    def limiter_spend(self, account: Account, read: int | None) -> int:
        """The spend the limiter admits against: its own while the key is busy, else the larger
        of its own and the ledger figure."""
        if account.open or read is None:
            return account.known
        return max(account.known, read)

    def expected_refusal(self, request: Request, read: int | None) -> str | None:
        """The budget first, then rpm and tpm over the last 60 s."""
        account, limits = request.account, request.account.limits
        if limits.budget_pico is not None and \
                self.limiter_spend(account, read) + account.reserved >= limits.budget_pico:
            return "insufficient_quota"
        window = self.window(account)
        if limits.rpm is not None and len(window) >= limits.rpm:
            return "rate_limit_exceeded"
        if limits.tpm is not None and sum(e[1] for e in window) + request.tokens > limits.tpm:
            return "rate_limit_exceeded"  # a request larger than tpm included
        return None

    def admit(self, request: Request, read: int | None) -> Pending:
        """The model's side of an admission: the reservation is open and in the window."""
        account = request.account
        account.known = self.limiter_spend(account, read)
        pending = Pending(f"cmpl-{self.run_id}-{next(self.serial)}", request, self.now(),
                          [self.clock.now, request.tokens])
        account.admitted.append(pending.entry)
        account.open[pending.id] = pending
        account.largest = max(account.largest or 0, request.cost)
        return pending

    async def attempt(self, request: Request) -> dict[str, str] | APIError:
        """Metering.reserve: the rate-limit headers, or the 429 it raised."""
        try:
            return await self.metering.reserve(request.job, request.raw)
        except APIError as refused:
            return refused

    def check_admission(self, request: Request, read: int | None, expected: str | None,
                        outcome: dict[str, str] | APIError) -> Pending | None:
        """The outcome is the expected one. An admission reserved exactly the request's tokens
        and cost, and its headers report the window's remaining requests and tokens; the model
        records it (the admitted Pending, else None)."""
        reservation = getattr(request.raw.state, "reservation", None)
        if isinstance(outcome, APIError):
            assert (outcome.status, outcome.code, reservation) == (429, expected, None)
            return None
        assert expected is None
        account = request.account
        assert (reservation.key_id, reservation.tokens, reservation.cost_pico,
                reservation.request_ts) == (account.key_id, request.tokens, request.cost,
                                            self.clock.now)
        pending = self.admit(request, read)
        window = self.window(account)
        if account.limits.rpm is not None:
            assert outcome["x-ratelimit-remaining-requests"] == str(
                account.limits.rpm - len(window))
        if account.limits.tpm is not None:
            assert outcome["x-ratelimit-remaining-tokens"] == str(
                account.limits.tpm - sum(e[1] for e in window))
        return pending

    # ---- admission: rules ----------------------------------------------------------------------

    @rule(target=requests, later=LATER, who=st.integers(0, 1), shape=request_strategy)
    def reserve(self, later, who, shape):
        self.clock.now += later
        request = self.request(self.account(who), **shape)
        read = self.ledger_read(request.account)
        expected = self.expected_refusal(request, read)
        before = self.limiter.usage(request.account.key_id)
        outcome = self.run(self.attempt(request))
        pending = self.check_admission(request, read, expected, outcome)
        if pending is None:
            assert self.limiter.usage(request.account.key_id) == before  # a refusal: no change
            return multiple()
        return pending

    # ---- billing: the model -------------------------------------------------------------------

    def make_bill(self, pending: Pending, status: str, produced: list, cached: list) -> Bill:
        """The engine's outputs for `pending` fed to a UsageTally: per choice with a fraction in
        `produced`, a halfway output then its last, interleaved across choices (cumulative
        counts, as the engine reports them); and the counts and cost the model expects."""
        job = pending.request.job
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
                finish = None if status != "completed" else \
                    "length" if made == max_tokens else "stop"

                def output(count, reason, i=i, p=p):
                    return RequestOutput(ids[p], i, [5] * count, "", [], reason, None,
                                         len(job.prompts[p]), in_cache, count)

                halfway.append(output(made // 2, None))
                last.append(output(made, finish))
        tally = UsageTally()
        for out in halfway + last:
            tally.add(out)
        cost = cost_of(job.model.entry.price, prompt, cached_total, completion)
        return Bill(tally, status, finish, prompt, cached_total, completion, cost)

    async def send_bill(self, pending: Pending, bill: Bill) -> None:
        await self.metering.bill(pending.request.job, pending.id, pending.request.raw,
                                 bill.tally, bill.status, bill.finish_reason,
                                 {"arrival": pending.arrival})

    def recorded(self, pending: Pending, bill: Bill) -> None:
        """The model's side of the ledger write: one row, the key's spend grows."""
        account = pending.account
        # what a request uses never exceeds what it reserved
        assert bill.prompt + bill.completion <= pending.request.tokens
        assert bill.cost <= pending.cost
        self.rows[pending.id] = UsageEntry(
            pending.id, account.key_id, pending.request.job.model.id, bill.prompt, bill.cached,
            bill.completion, bill.cost, bill.status, bill.finish_reason, pending.arrival,
            NOT_COMPARED)
        account.spend += bill.cost
        account.local += bill.cost

    def finished(self, pending: Pending, tokens: int, cost: int, state: str) -> None:
        """The model's side of limiter.finish: the reservation closes, its true cost is known,
        and its window entry (while in the window) counts the tokens it used."""
        account = pending.account
        pending.state = state
        del account.open[pending.id]
        account.known += cost
        if self.clock.now - pending.entry[0] < WINDOW_S:
            pending.entry[1] = tokens

    def bill(self, pending: Pending, status: str, produced: list, cached: list) -> None:
        bill = self.make_bill(pending, status, produced, cached)
        before = self.limiter.usage(pending.account.key_id)
        self.run(self.send_bill(pending, bill))
        if pending.state == "billed":
            # a retry: the first row stands (the invariants check it), nothing handed back twice
            assert self.limiter.usage(pending.account.key_id) == before
            return
        self.recorded(pending, bill)
        self.finished(pending, bill.prompt + bill.completion, bill.cost, "billed")

    def close(self, pending: Pending) -> None:
        """The stream's on_close: gives an unbilled reservation back unused, and changes nothing
        for a request already billed."""
        before = self.limiter.usage(pending.account.key_id)
        self.run(self.metering.release_unbilled(pending.request.raw))
        if pending.state == "billed":
            assert self.limiter.usage(pending.account.key_id) == before
            return
        self.finished(pending, 0, 0, "released")

    # ---- billing: rules -----------------------------------------------------------------------

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

    @rule(later=LATER, pending=requests, tokens=st.integers(0, 100))
    def another_replica_bills(self, later, pending, tokens):
        """While `pending` runs here, another server process writes a row for the same key (and
        retries it): this limiter learns of it only from the ledger, once the key is idle (and
        only if it has a budget: without one the ledger is not read)."""
        self.clock.now += later
        account = pending.account
        rid = f"cmpl-{self.run_id}-replica-{next(self.serial)}"
        cost = cost_of(PRICES["m/flat"], 0, 0, tokens)
        entry = UsageEntry(rid, account.key_id, "m/flat", 0, 0, tokens, cost, "completed",
                           "stop", self.now(), self.now())
        assert self.ledger.record(entry) is True
        assert self.ledger.record(replace(entry, cost_pico=cost + 1)) is False
        self.rows[rid] = replace(entry, finished_at=NOT_COMPARED)
        account.spend += cost

    # ---- a reservation racing a bill of the same key ------------------------------------------

    @rule(target=requests, later=LATER, pending=consumes(requests), shape=request_strategy,
          status=st.sampled_from(STATUSES), produced=fractions, cached=cached_fractions,
          order=st.sampled_from(["read, bill, reserve", "record, reserve, finish"]))
    def reserve_racing_a_bill(self, later, pending, shape, status, produced, cached, order):
        """A new request of `pending`'s key is admitted while `pending` is billed, the two
        interleaved in one of the two ways that matter (forced through the ledger's hooks):
        - "read, bill, reserve": the new request reads the ledger's spend, `pending` is billed
          (row written, reservation handed back), then the limiter sees the stale figure;
        - "record, reserve, finish": `pending`'s row is written, the new request reads the ledger
          (the row's cost in it) and is admitted against the limiter while `pending` still holds
          its reservation, then `pending` hands it back.
        `pending` is billed once either way (not retried later)."""
        self.clock.now += later
        account = pending.account
        request = self.request(account, **shape)
        bill = self.make_bill(pending, status, produced, cached)
        if order == "read, bill, reserve":
            read = self.ledger_read(account)  # before the bill: misses its cost
            self.recorded(pending, bill)
            self.finished(pending, bill.prompt + bill.completion, bill.cost, "billed")
            expected = self.expected_refusal(request, read)
            if read is None:  # no budget, no ledger read: simply the bill, then the reservation
                self.run(self.send_bill(pending, bill))
            else:
                self.ledger.after_spend = lambda: self.run_from_worker(
                    self.send_bill(pending, bill))
            outcome = self.run(self.attempt(request))
            admitted = self.check_admission(request, read, expected, outcome)
        else:
            self.recorded(pending, bill)
            read = self.ledger_read(account)  # after the row: holds its cost
            expected = self.expected_refusal(request, read)  # `pending` still open
            outcomes = []
            self.ledger.after_record = lambda: outcomes.append(
                self.run_from_worker(self.attempt(request)))
            self.run(self.send_bill(pending, bill))
            (outcome,) = outcomes
            admitted = self.check_admission(request, read, expected, outcome)
            self.finished(pending, bill.prompt + bill.completion, bill.cost, "billed")
        assert self.ledger.after_spend is None and self.ledger.after_record is None  # both ran
        return multiple() if admitted is None else admitted

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
                                     account.reserved, account.known)
            # never a cost billed here missed, never more than the ledger holds
            assert account.local <= usage.spent_pico <= self.ledger.spend(account.key_id)
            if account.local == account.spend:  # no other replica wrote for this key
                assert usage.spent_pico == account.spend

    @invariant()
    def spend_stays_below_budget_plus_the_largest_reservation(self):
        for account in self.accounts:
            budget = account.limits.budget_pico
            if budget is not None and account.largest is not None:
                assert account.local + account.reserved < budget + account.largest


MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_reserve_bill_abort_retry_and_release_keep_rows_spend_and_reservations_consistent(
        store, new_limiter):
    run_state_machine_as_test(lambda: MeteringMachine(store, new_limiter),
                              settings=MACHINE_SETTINGS)
