"""Rate budgets per (provider, model): requests and tokens per minute and per second.

A `Budget` holds one rolling window per configured limit (rpm, rps for requests; tpm, tps for tokens).
What it guarantees:

- Over any `period` (60 s or 1 s) a window admits at most its limit. A fresh window is full (the whole limit may
  go at once); capacity comes back as admissions age out. Once a window has been saturated, freed capacity is
  handed out paced (see `_Window`), so requests reach the provider one by one instead of in bursts. Rolling
  windows rather than a refilling bucket: a bucket that starts full admits up to twice the limit within one
  window, and a provider counting by the minute answers 429 to the excess.
- `acquire(tokens, priority)` pays one request and its token reservation to every window at once, or waits.
  Waiters are served by priority (higher first), then in arrival order. Only the first waiter sleeps on a timer,
  until the computed moment its payment fits; the others wait for their turn. Nothing polls.
- A payment larger than a window's whole limit raises `BudgetTooSmall` at once instead of waiting forever.
- `settle(ticket, reserved, used)` corrects the token windows by the real usage of that request.
- `restamp(ticket)` moves an admission to now, for a request that waited (for a connection slot) after paying:
  the provider counts it from when it arrives.
- `cooldown(seconds)` blocks every payment of the budget until then (a 429 rate_limit_exceeded).
- `sync_headers` learns limits the configuration left open from `x-ratelimit-*` (or Anthropic's) headers, and
  when the provider reports more use than we know of (another client on the same key), counts the difference
  until the provider's reset. It never lowers our count: answers arrive out of order.

Time comes from a `Clock` (real by default), so tests can drive a budget on a fake one.
"""

from __future__ import annotations

import heapq
import re
import time
from collections import deque
from datetime import datetime
from math import ceil
from typing import Any, NamedTuple

import anyio

from tcia_async.config import Limits

# While a window is hot, admissions are spaced PACE x the average spacing (period / limit) per unit: a freed
# window refills within a tenth of its period, and at 100 requests/s each request reaches the provider alone.
PACE = 0.05
# GCRA tolerance: a paced admission may come this much early as long as the average spacing holds. Timers fire
# on whole milliseconds, so waits are rounded up to whole milliseconds and the slack absorbs the rounding.
PACE_SLACK = 0.001


class Clock:
    """Real time: `now()` in monotonic seconds, `wait(event, timeout)` on the event loop's timer."""

    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: anyio.Event, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await event.wait()


REAL_CLOCK = Clock()
WAIT = object()  # pay_now: the payment does not fit now


class BudgetTooSmall(Exception):
    """One request needs more than a window's whole limit; it can never be sent under this limit."""


class _Window:
    """Amounts admitted during the last `period` seconds. Admissions within `period/1000` of each other share one
    entry `[first admission, expiry, amount]` that leaves at the latest of their expiries (only ever stricter).

    Pacing: a window saturated within the last period is hot; while hot, an admission of amount `a` holds the next
    one back `a * PACE * period / limit` seconds (GCRA with PACE_SLACK). A window never saturated is never paced.

    Margins cover the time between our admission and the provider's: 1 % of the period + 20 ms for a free burst,
    0.5 % + 15 ms for paced admissions; both double (up to 10 % of the period) on each 429.
    """

    __slots__ = ("name", "limit", "period", "merge", "margin", "paced_margin", "entries", "used", "learned",
                 "hot_until", "next_at", "counts_tokens")

    def __init__(self, name: str, limit: float, period: float, learned: bool = False) -> None:
        self.name = name
        self.limit = float(limit)
        self.period = period
        self.merge = period / 1000.0
        self.margin = period * 0.01 + 0.02
        self.paced_margin = period * 0.005 + 0.005
        self.entries: deque[list[float]] = deque()
        self.used = 0.0
        self.learned = learned
        self.hot_until = 0.0
        self.next_at = 0.0
        self.counts_tokens = name in ("tpm", "tps")

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][1] <= now:
            self.used -= entries.popleft()[2]
        if not entries:
            self.used = 0.0  # no float drift across a long run

    def blocked(self, amount: float, now: float) -> float:
        """Seconds until `amount` may be admitted (0.0: now); a saturated window becomes hot."""
        if self.used + amount > self.limit:
            wait = self._wait_for(amount, now)
            if wait <= 0.0:
                # Expired entries behind one that expires later (restamped, synced): count them out now.
                self.entries = deque(e for e in self.entries if e[1] > now)
                self.used = sum(e[2] for e in self.entries)
                return 0.0
            self.hot_until = now + wait + self.period + self.margin
            return wait
        if now < self.next_at - PACE_SLACK:
            return self.next_at - PACE_SLACK - now
        return 0.0

    def add(self, amount: float, now: float) -> list[float]:
        """Admit `amount` now; the entry it went into: [first admission, expiry, amount, free], `free` 1.0 when
        an admission of it was not paced (part of a burst)."""
        free = 1.0
        if now < self.hot_until:
            self.next_at = max(self.next_at, now) + amount * PACE * self.period / self.limit
            expiry = now + self.period + self.paced_margin
            free = 0.0
        else:
            expiry = now + self.period + self.margin
        self.used += amount
        if self.entries:
            last = self.entries[-1]
            if now - last[0] < self.merge:
                last[1] = max(last[1], expiry)
                last[2] += amount
                last[3] = max(last[3], free)
                return last
        entry = [now, expiry, amount, free]
        self.entries.append(entry)
        return entry

    def _wait_for(self, amount: float, now: float) -> float:
        excess = self.used + amount - self.limit
        freed = 0.0
        # Entries are in admission order; restamped and synced ones may expire out of that order.
        for e in sorted(self.entries, key=_expiry):
            freed += e[2]
            if freed >= excess - 1e-9:
                return e[1] - now
        return self.period + self.margin


def _expiry(entry: list[float]) -> float:
    return entry[1]


class _HeaderNames(NamedTuple):
    requests_remaining: str
    requests_limit: str
    requests_reset: str
    tokens_remaining: str
    tokens_limit: str
    tokens_reset: str


_HEADER_SCHEMES = (
    _HeaderNames("x-ratelimit-remaining-requests", "x-ratelimit-limit-requests", "x-ratelimit-reset-requests",
                 "x-ratelimit-remaining-tokens", "x-ratelimit-limit-tokens", "x-ratelimit-reset-tokens"),
    _HeaderNames("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-limit",
                 "anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-remaining",
                 "anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-reset"),
)

_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration string (`1s`, `6m0s`, `12ms`, `1m30.5s`, `1h2m`); a bare number is seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _GO_PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


def parse_reset(text: str) -> float | None:
    """Seconds until a reset given as a Go duration (OpenAI) or an RFC 3339 time (Anthropic)."""
    secs = parse_go_duration(text)
    if secs is not None:
        return secs
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, when.timestamp() - time.time())


def _count(value: str | None) -> float | None:
    """A header's count, or None when absent or unusable (negative, not finite: a provider's bug, not a limit)."""
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if 0.0 <= x < float("inf") else None


class _Waiter:
    __slots__ = ("order", "event")

    def __init__(self, priority: int, seq: int) -> None:
        self.order = (-priority, seq)
        self.event: anyio.Event | None = None

    def __lt__(self, other: _Waiter) -> bool:
        return self.order < other.order


class Budget:
    """The rate budget of one (provider, model). See the module docstring for what it guarantees."""

    def __init__(self, limits: Limits, learn: bool = True, clock: Clock = REAL_CLOCK) -> None:
        self.requests: list[_Window] = []
        self.tokens: list[_Window] = []
        if limits.rpm:
            self.requests.append(_Window("rpm", limits.rpm, 60.0))
        if limits.rps:
            self.requests.append(_Window("rps", limits.rps, 1.0))
        if limits.tpm:
            self.tokens.append(_Window("tpm", limits.tpm, 60.0))
        if limits.tps:
            self.tokens.append(_Window("tps", limits.tps, 1.0))
        self.learn = learn
        self.clock = clock
        self.silent = 0  # answers without rate-limit headers in a row (see sync_headers)
        self.cooldown_until = 0.0
        self._waiters: list[_Waiter] = []  # a heap: priority, then arrival
        self._seq = 0

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tokens)

    @property
    def limited(self) -> bool:
        return bool(self.requests or self.tokens) or self.cooldown_until > 0.0

    # -- paying -------------------------------------------------------------------------------------------------

    def try_pay(self, tokens: float = 0.0) -> tuple[float, Any]:
        """Pay now and return (0.0, ticket), or pay nothing and return (seconds until the payment fits, None)."""
        now = self.clock.now()
        if now < self.cooldown_until:
            return self.cooldown_until - now, None
        wait = 0.0
        for w in self.requests:
            if w.limit < 1.0:
                raise BudgetTooSmall(f"{w.name} limit {w.limit:g} is below one request")
            w.expire(now)
            wait = max(wait, w.blocked(1.0, now))
        for w in self.tokens:
            if tokens > w.limit:
                raise BudgetTooSmall(
                    f"request needs about {int(tokens)} tokens, more than the whole {w.name} limit of {w.limit:g}")
            w.expire(now)
            wait = max(wait, w.blocked(tokens, now))
        if wait > 0.0:
            return wait, None
        ticket = [(w, w.add(1.0, now)) for w in self.requests]
        ticket += [(w, w.add(tokens, now)) for w in self.tokens]
        return 0.0, ticket

    def pay_now(self, tokens: float = 0.0, priority: int = 0) -> Any:
        """`acquire` without waiting: its ticket when the payment goes through now, else WAIT."""
        if not self.limited:
            return None
        if not self._waiters or priority > -self._waiters[0].order[0]:
            wait, ticket = self.try_pay(tokens)
            if wait == 0.0:
                return ticket
        return WAIT

    async def acquire(self, tokens: float = 0.0, priority: int = 0) -> Any:
        """Pay one request and `tokens` to every window, waiting until it fits. Returns a ticket for `settle`
        and `restamp` (None when nothing is limited)."""
        ticket = self.pay_now(tokens, priority)
        if ticket is not WAIT:
            return ticket
        self._seq += 1
        me = _Waiter(priority, self._seq)
        heapq.heappush(self._waiters, me)
        try:
            while True:
                me.event = anyio.Event()
                if self._waiters[0] is not me:
                    await me.event.wait()  # our turn comes with a wake-up
                    continue
                wait, ticket = self.try_pay(tokens)
                if wait == 0.0:
                    return ticket
                await self.clock.wait(me.event, ceil(wait * 1000.0) / 1000.0)  # whole ms: see PACE_SLACK
        finally:
            self._waiters.remove(me)
            heapq.heapify(self._waiters)
            self._wake()

    def _wake(self) -> None:
        """Let the first waiter look at the windows again (something changed, or it is its turn)."""
        if self._waiters:
            ev = self._waiters[0].event
            if ev is not None:
                ev.set()

    def settle(self, ticket: Any, reserved: float, used: float) -> None:
        """Correct the token windows by the difference between a reservation and the real usage."""
        if not ticket or used == reserved:
            return
        now = self.clock.now()
        for w, entry in ticket:
            if w.counts_tokens and entry[1] > now:  # still in the window
                delta = max(used - reserved, -entry[2])  # never take back more than the entry holds
                entry[2] += delta
                w.used += delta
        if used < reserved:
            self._wake()

    def answered(self, ticket: Any, wire_s: float) -> None:
        """The provider has answered the request of `ticket` after `wire_s` seconds on the wire. A request admitted
        in a burst counts from the middle of its time on the wire: a burst reaches the provider spread over more
        than our margins (new connections, the event loop's backlog), and a paced request after it must not land
        within the provider's window of the burst's last arrivals. (Arriving takes less than answering for a
        model API: the middle is a later estimate of the arrival, only ever stricter.) Paced admissions travel
        alone and keep their time."""
        if not ticket:
            return
        arrived = self.clock.now() - wire_s / 2
        for w, entry in ticket:
            if entry[3]:
                entry[1] = max(entry[1], arrived + w.period + w.margin)

    def restamp(self, ticket: Any) -> None:
        """The request of `ticket` leaves only now: its admissions expire a period from now (later: stricter)."""
        if not ticket:
            return
        now = self.clock.now()
        for w, entry in ticket:
            entry[1] = max(entry[1], now + w.period + w.margin)

    def widen_margins(self) -> None:
        """The provider refused what our windows admitted: allow more time between our clock and theirs."""
        for w in self.requests + self.tokens:
            w.margin = min(w.margin * 2.0, w.period * 0.1)
            w.paced_margin = min(w.paced_margin * 2.0, w.period * 0.1)

    def token_headroom(self) -> float:
        """Tokens that fit in every token window right now (infinite without token windows)."""
        now = self.clock.now()
        room = float("inf")
        for w in self.tokens:
            w.expire(now)
            room = min(room, w.limit - w.used)
        return room

    def cooldown(self, seconds: float) -> None:
        """Block every payment until `seconds` from now (extends, never shortens, a running cooldown)."""
        self.cooldown_until = max(self.cooldown_until, self.clock.now() + max(0.0, seconds))
        self._wake()

    # -- header sync ----------------------------------------------------------------------------------------------

    def sync_headers(self, headers: Any) -> None:
        """Adopt the provider's view from OpenAI `x-ratelimit-*` or Anthropic `anthropic-ratelimit-*` headers."""
        for names in _HEADER_SCHEMES:
            rem = headers.get(names.requests_remaining)
            rem_t = headers.get(names.tokens_remaining)
            if rem is None and rem_t is None:
                continue
            self.silent = 0
            if rem is not None:
                self._sync(False, _count(rem), _count(headers.get(names.requests_limit)),
                           headers.get(names.requests_reset))
            if rem_t is not None:
                self._sync(True, _count(rem_t), _count(headers.get(names.tokens_limit)),
                           headers.get(names.tokens_reset))
            self._wake()
            return
        self.silent += 1

    def _sync(self, tokens: bool, remaining: float | None, limit: float | None, reset: str | None) -> None:
        if remaining is None:
            return
        windows = self.tokens if tokens else self.requests
        minute = next((w for w in windows if w.period == 60.0), None)
        if minute is None:
            if not (self.learn and limit):
                return
            minute = _Window("tpm" if tokens else "rpm", limit, 60.0, learned=True)
            windows.append(minute)
        elif minute.learned and limit and limit != minute.limit:
            minute.limit = limit
        limit = limit or minute.limit
        now = self.clock.now()
        minute.expire(now)
        extra = (limit - remaining) - minute.used
        if extra >= 1.0:
            secs = parse_reset(reset) if reset else None
            ttl = minute.period if secs is None else min(secs, minute.period)
            minute.entries.append([now, now + ttl, extra, 0.0])
            minute.used += extra


class Limiter:
    """All budgets of an engine, one per (provider, model), created on first use from the configured limits."""

    def __init__(self, default: Limits, per_model: dict[str, Limits] | None = None, learn: bool = True,
                 clock: Clock = REAL_CLOCK) -> None:
        self.default = default
        self.per_model = per_model or {}
        self.learn = learn
        self.clock = clock
        self._budgets: dict[tuple[str, str], Budget] = {}

    def budget(self, provider: str, model: str) -> Budget:
        key = (provider, model)
        b = self._budgets.get(key)
        if b is None:
            b = self._budgets[key] = Budget(self.per_model.get(model, self.default), self.learn, self.clock)
        return b
