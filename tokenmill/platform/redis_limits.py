"""Rate limits and budgets shared by several server processes (ingress replicas) through Redis.

Stage: the same as limits.py's, with the same rules, messages and headers. `RedisLimiter` keeps
each key's window, reservations and spend in Redis, and decides every `reserve` and `finish` in
one Lua script: one atomic round trip that prunes the key's window, checks the budget, rpm and
tpm, and records the admission or returns what the refusal's message needs (Redis runs one
script at a time, so N simultaneous requests against rpm L give exactly L admissions, whichever
processes they come from). The messages and headers are built here, from what the script
returns, by limits.py's helpers.

Layout, per API key, under `{prefix}{<key id>}:` (the braces keep a key's data in one slot of a
Redis Cluster):
- `win`  ZSET reservation id -> admission time (µs): the requests admitted in the last 60 s
- `tok`  HASH reservation id -> tokens (reserved; the true count once finished), for `win`'s
- `wtok` the sum of `tok`
- `open` ZSET reservation id -> admission time (µs): the unfinished reservations
- `cost` HASH reservation id -> cost_pico reserved, for `open`'s
- `reserved` the sum of `cost`; `spent` the spend the limiter knows (limits.py's docstring)
- `ids`  the last reservation id given (INCR: unique whichever process reserves)

Exact integers: Lua numbers are doubles, exact only below 2^53, and picodollars pass that (USD
9,007). So `cost`, `reserved` and `spent` are decimal strings, added and compared by the script 7
digits at a time; token counts and times (µs since the epoch, about 2^51) stay below 2^53.

Time: Redis's clock (TIME), which every replica shares; an injected `clock` (tests) is passed to
the script instead. Expiry also runs on Redis's clock: `win`, `tok` and `wtok` expire 61 s after
the key's last admission (the window is empty by then); `open`, `cost` and `reserved` expire
`lost_after_s` after it. `spent` and `ids` never expire: `spent` holds spend the ledger may not
show for a long time yet (records spooled through a store outage with --ledger-fail-open), which
would slip past the budget if forgotten; `ids` restarting would let a late `finish` close a newer
reservation with a reused id.

Lost reservations: one left unfinished `lost_after_s` after its admission (its process died, or
Redis went down before `finish`) is released, so that it cannot hold the key's budget forever;
its cost reaches the limiter through the ledger figure once the key is idle. `lost_after_s`
must exceed the longest request (the server's --request-timeout, 600 s by default).

Outage: calls time out after TIMEOUT_S and are never retried (a `reserve` retried after its
reply was lost would admit twice); an unreachable Redis raises `LimiterUnavailable`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.retry import Retry

from tokenmill.platform.limits import (WINDOW_S, Admitted, KeyUsage, Limiter, LimiterUnavailable,
                                       Limits, Reservation, Window, check_budget, check_counts,
                                       check_rate, rate_headers)

DEFAULT_PREFIX = "tokenmill:limits:"
LOST_AFTER_S = 3600.0  # an unfinished reservation this old is released
TIMEOUT_S = 1.0  # connecting, and each call (the server calls from worker threads, not its loop)
US = 1_000_000  # the scripts count time in microseconds
FIELDS = ("win", "tok", "wtok", "open", "cost", "reserved", "spent", "ids")  # the scripts' KEYS
OUTAGES = (redis.ConnectionError, redis.TimeoutError, ReadOnlyError, OutOfMemoryError)

# Decimal integers as strings, exact at any size (no leading zeros, as Python's str(int)).
DECIMALS_LUA = r"""
local function int(x) return string.format('%d', x) end
local function limbs(s)  -- 7 digits each, least significant first
  local out = {}
  for last = #s, 1, -7 do out[#out + 1] = tonumber(string.sub(s, math.max(1, last - 6), last)) end
  return out
end
local function combine(a, b, sign)  -- a + b (sign 1), or a - b (sign -1, a >= b)
  local x, y, carry = limbs(a), limbs(b), 0
  for i = 1, math.max(#x, #y) + 1 do
    local v = (x[i] or 0) + sign * (y[i] or 0) + carry  -- |v| < 2e7: exact
    carry = math.floor(v / 1e7)  -- 1 on a carry, -1 on a borrow
    x[i] = v - carry * 1e7
  end
  local top = #x
  while top > 1 and x[top] == 0 do top = top - 1 end
  local digits = {int(x[top])}
  for i = top - 1, 1, -1 do digits[#digits + 1] = string.format('%07d', x[i]) end
  return table.concat(digits)
end
local function less(a, b) return #a < #b or (#a == #b and a < b) end
"""

# Every script: the key's state, `now`, and the state pruned to it.
STATE_LUA = r"""
local win, tok, wtok, open, cost, reserved, spent, ids = unpack(KEYS)
local window_us, lost_us = tonumber(ARGV[2]), tonumber(ARGV[3])
local BATCH = 1000  -- ids per command: Lua's unpack takes a few thousand values at most
local function get(key) return redis.call('GET', key) or '0' end

local now = tonumber(ARGV[1])  -- the injected clock, else Redis's, shared by every replica
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The window's entries first..last (0-based, oldest first): their admission times and tokens.
local function entries(first, last)
  local page, members, times = redis.call('ZRANGE', win, first, last, 'WITHSCORES'), {}, {}
  for i = 1, #page, 2 do
    members[#members + 1] = page[i]
    times[#times + 1] = tonumber(page[i + 1])
  end
  if #members == 0 then return times, {} end
  local counts = redis.call('HMGET', tok, unpack(members))
  for i = 1, #counts do counts[i] = tonumber(counts[i]) end
  return times, counts
end

-- Drop the requests admitted 60 s ago or more (the window is (now - 60 s, now]), and release
-- the reservations unfinished `lost_us` after their admission.
local function prune()
  while true do
    local old = redis.call('ZRANGEBYSCORE', win, '-inf', int(now - window_us), 'LIMIT', 0, BATCH)
    if #old == 0 then break end
    local gone = 0
    for _, n in ipairs(redis.call('HMGET', tok, unpack(old))) do gone = gone + tonumber(n) end
    redis.call('INCRBY', wtok, int(-gone))
    redis.call('HDEL', tok, unpack(old))
    redis.call('ZREM', win, unpack(old))
  end
  while true do
    local lost = redis.call('ZRANGEBYSCORE', open, '-inf', int(now - lost_us), 'LIMIT', 0, BATCH)
    if #lost == 0 then break end
    local held = get(reserved)
    for _, c in ipairs(redis.call('HMGET', cost, unpack(lost))) do held = combine(held, c, -1) end
    redis.call('SET', reserved, held, 'KEEPTTL')
    redis.call('HDEL', cost, unpack(lost))
    redis.call('ZREM', open, unpack(lost))
  end
end
prune()
"""

# ARGV[4..9]: tokens, cost_pico, the ledger's spend, budget_pico, rpm, tpm ('': no limit).
# Admitted: {1, id, now, the window's requests and tokens with it}. Refused (nothing changed):
# {0, now, spent, reserved, window tokens, then each window entry's admission time and tokens,
# oldest first}.
RESERVE_LUA = r"""
local tokens, cost_pico, ledger, budget = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local rpm, tpm = tonumber(ARGV[8]), tonumber(ARGV[9])
local known = get(spent)  -- the ledger lacks nothing the limiter counted only while none is open
if redis.call('ZCARD', open) == 0 and less(known, ledger) then known = ledger end
local held, count, window_tokens = get(reserved), redis.call('ZCARD', win), tonumber(get(wtok))
if (budget ~= '' and not less(combine(known, held, 1), budget))
    or (rpm and count >= rpm) or (tpm and window_tokens + tonumber(tokens) > tpm) then
  local reply = {0, now, known, held, window_tokens}
  for first = 0, count - 1, BATCH do
    local times, counts = entries(first, first + BATCH - 1)
    for i = 1, #times do
      reply[#reply + 1] = times[i]
      reply[#reply + 1] = counts[i]
    end
  end
  return reply
end
local id = redis.call('INCR', ids)
redis.call('ZADD', win, int(now), id)
redis.call('HSET', tok, id, tokens)
redis.call('INCRBY', wtok, tokens)
redis.call('ZADD', open, int(now), id)
redis.call('HSET', cost, id, cost_pico)
redis.call('SET', reserved, combine(held, cost_pico, 1))
redis.call('SET', spent, known)
-- idle keys go: the window's once it is empty, the reservations' once they would be lost
local window_ms, lost_ms = int(window_us / 1000 + 1000), int(lost_us / 1000)
for _, key in ipairs({win, tok, wtok}) do redis.call('PEXPIRE', key, window_ms) end
for _, key in ipairs({open, cost, reserved}) do redis.call('PEXPIRE', key, lost_ms) end
return {1, id, now, count + 1, window_tokens + tonumber(tokens)}
"""

# ARGV[4..6]: reservation id, tokens used, cost_pico. 1: finished now; 0: finished before (or
# released as lost).
FINISH_LUA = r"""
local id, tokens, cost_pico = ARGV[4], ARGV[5], ARGV[6]
local taken = redis.call('HGET', cost, id)
if not taken then return 0 end
redis.call('HDEL', cost, id)
redis.call('ZREM', open, id)
redis.call('SET', reserved, combine(get(reserved), taken, -1), 'KEEPTTL')
redis.call('SET', spent, combine(get(spent), cost_pico, 1))
local counted = redis.call('HGET', tok, id)
if counted then  -- still in the window: it counts what it used
  redis.call('HSET', tok, id, tokens)
  redis.call('INCRBY', wtok, int(tonumber(tokens) - tonumber(counted)))
end
return 1
"""

# {now, requests, window tokens, newest admission, newest admission holding tokens (false: none),
# open reservations, reserved, spent}
VIEW_LUA = r"""
local count, newest, counting = redis.call('ZCARD', win), false, false
for last = count - 1, 0, -BATCH do
  local times, counts = entries(math.max(0, last - BATCH + 1), last)
  newest = newest or times[#times]
  for i = #times, 1, -1 do
    if counts[i] > 0 then counting = times[i]; break end
  end
  if counting then break end
end
return {now, count, tonumber(get(wtok)), newest, counting, redis.call('ZCARD', open),
        get(reserved), get(spent)}
"""


class RedisLimiter(Limiter):
    """Limits shared by every process using the same Redis and prefix.

    Invariants (`check_integrity`), per key: `win` and `tok` hold the same ids, admitted less
    than 60 s ago, and `wtok` is the sum of `tok`; `open` and `cost` hold the same ids, admitted
    less than `lost_after_s` ago, and `reserved` is the sum of `cost`; no count is negative;
    `spent` and `ids` never expire."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], float] | None = None,
                 lost_after_s: float = LOST_AFTER_S) -> None:
        self._client = client
        self.prefix = prefix  # every key's data is under it
        self._clock = clock  # seconds, never decreasing; None: Redis's clock
        self._durations = [str(round(WINDOW_S * US)), str(round(lost_after_s * US))]
        self._reserve = client.register_script(DECIMALS_LUA + STATE_LUA + RESERVE_LUA)
        self._finish = client.register_script(DECIMALS_LUA + STATE_LUA + FINISH_LUA)
        self._view = client.register_script(DECIMALS_LUA + STATE_LUA + VIEW_LUA)

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], float] | None = None,
                 lost_after_s: float = LOST_AFTER_S) -> RedisLimiter:
        """A limiter on the Redis at `url` (redis://HOST:PORT/DB, rediss://, unix://), checked
        now: `LimiterUnavailable` if it cannot be reached, ValueError for a bad URL."""
        limiter = cls(connect(url), prefix, clock, lost_after_s)
        limiter._call(limiter._client.ping)
        return limiter

    @property
    def address(self) -> str:
        """Where the client connects, without any password."""
        options = self._client.connection_pool.connection_kwargs
        if "path" in options:
            return options["path"]
        return (f"{options.get('host', 'localhost')}:{options.get('port', 6379)}/"
                f"{options.get('db', 0)}")

    def reserve(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                spent_pico: int) -> Reservation:
        return self._admit(key_id, limits, tokens, cost_pico, spent_pico)[0]

    def reserve_with_headers(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                             spent_pico: int) -> tuple[Reservation, dict[str, str]]:
        """One round trip: the reserve script returns the window as it left it, and this
        admission is its newest entry (the newest holding tokens too, unless it holds none)."""
        reservation, requests, window_tokens = self._admit(key_id, limits, tokens, cost_pico,
                                                           spent_pico)
        if tokens == 0:  # the newest entry holding tokens is an older one: read the window
            return reservation, self.headers(key_id, limits)
        now = reservation.request_ts
        return reservation, rate_headers(limits, now, requests, window_tokens, now, now)

    def _admit(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
               spent_pico: int) -> tuple[Reservation, int, int]:
        """The reserve script: the reservation, and the window's requests and tokens with it;
        `RateLimited` as `reserve`."""
        check_counts(tokens=tokens, cost_pico=cost_pico, spent_pico=spent_pico)
        reply = self._run(self._reserve, key_id, tokens, cost_pico, spent_pico,
                          *("" if v is None else v
                            for v in (limits.budget_pico, limits.rpm, limits.tpm)))
        if reply[0] == 1:
            _, reservation_id, now, requests, window_tokens = reply
            return (Reservation(reservation_id, key_id, tokens, cost_pico, now / US), requests,
                    window_tokens)
        _, now, spent, reserved, window_tokens, *flat = reply
        entries = deque(Admitted(ts / US, n) for ts, n in zip(flat[::2], flat[1::2]))
        window = Window(entries, window_tokens)
        check_budget(window, limits, int(spent), int(reserved), now / US)
        check_rate(window, limits, tokens, now / US)
        raise AssertionError(f"the reserve script refused key {key_id} with no rule broken")

    def finish(self, reservation: Reservation, tokens: int, cost_pico: int) -> None:
        check_counts(tokens=tokens, cost_pico=cost_pico)
        self._run(self._finish, reservation.key_id, reservation.id, tokens, cost_pico)

    def headers(self, key_id: int, limits: Limits) -> dict[str, str]:
        if limits.rpm is None and limits.tpm is None:
            return {}
        now, requests, tokens, newest, counting, *_ = self._run(self._view, key_id)
        return rate_headers(limits, now / US, requests, tokens, _seconds(newest),
                            _seconds(counting))

    def usage(self, key_id: int) -> KeyUsage:
        _, requests, tokens, _, _, unfinished, reserved, spent = self._run(self._view, key_id)
        return KeyUsage(requests, tokens, unfinished, int(reserved), int(spent))

    def check_integrity(self) -> None:
        """The invariants, for every key under the prefix (pruned first); for tests."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "{*}:ids"
        for name in self._client.scan_iter(match=pattern, count=1000):
            key_id = int(name.decode()[len(self.prefix) + 1:].partition("}")[0])
            now = self._run(self._view, key_id)[0]
            self._check_key(self._keys(key_id), now)

    def _check_key(self, keys: list[str], now: int) -> None:
        win, tok, wtok, open_, cost, reserved, spent, ids = keys
        with self._client.pipeline(transaction=True) as pipe:
            pipe.zrange(win, 0, -1, withscores=True).hgetall(tok).get(wtok)
            pipe.zrange(open_, 0, -1, withscores=True).hgetall(cost).get(reserved)
            pipe.get(spent).ttl(spent).ttl(ids).ttl(win).ttl(open_)
            window, tokens, total, unfinished, costs, held, known, *ttls = pipe.execute()
        window_us, lost_us = map(int, self._durations)
        assert all(now - ts < window_us for _, ts in window)
        assert {member for member, _ in window} == set(tokens)
        assert int(total or 0) == sum(map(int, tokens.values()))
        assert all(int(n) >= 0 for n in tokens.values())
        assert all(now - ts < lost_us for _, ts in unfinished)
        assert {member for member, _ in unfinished} == set(costs)
        assert int(held or 0) == sum(map(int, costs.values()))
        assert int(known or 0) >= 0
        spent_ttl, ids_ttl, win_ttl, open_ttl = ttls
        assert spent_ttl in (-1, -2) and ids_ttl in (-1, -2)  # never expire (-2: not yet set)
        assert (win_ttl > 0) == bool(window) and (open_ttl > 0) == bool(unfinished)

    def _keys(self, key_id: int) -> list[str]:
        return [f"{self.prefix}{{{key_id}}}:{field}" for field in FIELDS]

    def _run(self, script, key_id: int, *args: int | str) -> list:
        now = "" if self._clock is None else str(round(self._clock() * US))
        return self._call(script, keys=self._keys(key_id),
                          args=[now, *self._durations, *map(str, args)])

    def _call(self, method: Callable, *args, **kwargs):
        """`method(...)` on the client, an unreachable Redis raising `LimiterUnavailable`."""
        try:
            return method(*args, **kwargs)
        except OUTAGES as exc:
            raise LimiterUnavailable(
                f"the rate limiter's Redis at {self.address} is unavailable: "
                f"{' '.join(str(exc).split())}") from exc


def connect(url: str) -> redis.Redis:
    """A client as the limiter needs one: quick to fail, never retrying (module docstring)."""
    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                retry=Retry(NoBackoff(), 0))


def _seconds(us: int | None) -> float | None:
    return None if us is None else us / US
