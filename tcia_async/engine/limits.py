"""Rate budgets per (provider, model): requests and tokens per minute and per second.

A `Budget` holds one rolling window per configured limit (rpm, rps for requests; tpm, tps for tokens).
Guarantees:

- Over any `period` (60 s or 1 s), what a window admits never exceeds its limit. A fresh window is full (the whole
  limit can go at once) and capacity comes back continuously as admissions age out of the window. Once a window
  has been saturated, freed capacity is handed out paced (see `_Window`), so requests reach the provider one by
  one instead of in lockstep bursts. Rolling
  windows are used instead of a linearly refilling bucket because a bucket that starts full and refills admits up
  to twice the limit within one window; a provider that counts rolling windows (our simulator, and any counting
  by the minute) answers 429 to that excess. Against a provider that uses a bucket the rate is the same.
- `acquire` pays one request and its token reservation to every window at once, or waits: first come, first
  served; a waiter sleeps until the computed moment its payment fits (or until the budget grows), never polls.
- A payment larger than a window's whole limit raises `BudgetTooSmall` at once instead of waiting forever.
- `settle(ticket, reserved, used)` corrects the token windows by the real usage of that request.
- `cooldown(seconds)` blocks every acquire of the budget until then (a 429 rate_limit_exceeded).
- `sync_headers` learns limits the configuration left open from `x-ratelimit-limit-*` (or Anthropic's) and, when
  the provider reports more use than we know of (`limit - remaining` above our count: another client on the same
  key, different counting), adds the difference until the provider's `reset`. It never lowers our count:
  answers arrive out of order and ours already includes requests the provider has not seen yet.

With no limit configured and none learned, `acquire` returns at once and costs a few attribute reads.
"""

from __future__ import annotations

import re
import time
from collections import deque
from datetime import datetime
from math import ceil as _ceil
from typing import Any, NamedTuple

import anyio

from tcia_async.config import Limits

_monotonic = time.monotonic
_INF = float("inf")


WAIT = object()  # pay_now: the payment does not fit now

# While a window is hot, admissions are spaced PACE x the average spacing (period / limit) per unit: fast enough
# that a freed window refills within a tenth of its period (the total run time grows by about that, once), slow
# enough that at 100 requests/s each request (about 0.3 ms of client and server CPU) reaches the provider alone.
PACE = 0.05
# Pacing is GCRA-style with this tolerance: a paced admission may come up to PACE_SLACK early as long as the
# average spacing holds. Event-loop timers fire on whole milliseconds (uvloop) and a sub-millisecond sleep spins
# in anyio's deadline check, so waits are rounded up to whole milliseconds and the slack absorbs the rounding.
PACE_SLACK = 0.001


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


class BudgetTooSmall(Exception):
    """One request needs more than a window's whole limit; it can never be sent under this limit."""


class _Window:
    """Amounts admitted during the last `period` seconds. Admissions within `period/1000` of each other share one
    entry that leaves the window at the latest of their expiries (this only delays expiry: still safe).

    Pacing. A window that has been saturated (a payment did not fit) within the last period is *hot*: while hot,
    each admission of amount `a` holds the next one back for `a * PACE * period / limit` seconds on average (a
    GCRA schedule that tolerates PACE_SLACK of earliness, never more). Without this, a
    window that started full frees its capacity in the same lockstep bursts it was filled in, and a burst reaches
    the provider spread over the time both sides need to write and read it; the provider counts arrivals, so the
    margin would have to cover a whole burst's spread. Paced admissions travel alone. A cold window (never
    saturated, e.g. limits far above the rate) is never paced and costs one comparison.

    Margins cover the time between our admission and the provider's: `margin` (1 % of the period + 20 ms) for
    admissions of a free burst, `paced_margin` (0.5 % + 5 ms) for paced ones; both are doubled (up to 10 % of the
    period) whenever the provider answers 429 to a request this window had admitted.
    """

    __slots__ = (
        "entries",
        "hot_until",
        "learned",
        "limit",
        "margin",
        "merge",
        "name",
        "next_at",
        "paced_margin",
        "period",
        "used",
    )

    def __init__(self, name: str, limit: float, period: float, learned: bool = False) -> None:
        self.name = name
        self.limit = float(limit)
        self.period = period
        self.merge = period / 1000.0
        self.margin = period * 0.01 + 0.02
        self.paced_margin = period * 0.005 + 0.015
        self.entries: deque[list[float]] = deque()  # [first admission, expiry, amount]
        self.used = 0.0
        self.learned = learned
        self.hot_until = 0.0  # paced until then (refreshed on every saturation)
        self.next_at = 0.0  # while hot: the paced time of the next admission (PACE_SLACK earlier at the soonest)

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][1] <= now:
            self.used -= entries.popleft()[2]
        if not entries:
            self.used = 0.0  # no float drift across a long run

    def blocked(self, amount: float, now: float) -> float:
        """Seconds until `amount` may be admitted (0.0: now); marks the window hot when it is saturated."""
        if self.used + amount > self.limit:
            wait = self.wait_for(amount, now)
            # Hot until a period after this payment fits, so the capacity freed then is paced too.
            self.hot_until = now + wait + self.period + self.margin
            return wait
        if now < self.next_at - PACE_SLACK:
            return self.next_at - PACE_SLACK - now
        return 0.0

    def add(self, amount: float, now: float) -> list[float]:
        if now < self.hot_until:
            nxt = self.next_at if self.next_at > now else now
            self.next_at = nxt + amount * PACE * self.period / self.limit
            expiry = now + self.period + self.paced_margin
        else:
            expiry = now + self.period + self.margin
        entries = self.entries
        self.used += amount
        if entries:
            last = entries[-1]
            if now - last[0] < self.merge:
                if expiry > last[1]:
                    last[1] = expiry
                last[2] += amount
                return last
        entry = [now, expiry, amount]
        entries.append(entry)
        return entry

    def wait_for(self, amount: float, now: float) -> float:
        excess = self.used + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0.0
        expiry = now
        for e in self.entries:  # in admission order; an entry may expire after a later one: take the max
            freed += e[2]
            if e[1] > expiry:
                expiry = e[1]
            if freed >= excess - 1e-9:
                return expiry - now
        return self.period + self.margin


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


def _num(value: str | None) -> float | None:
    """A header's count, or None when absent or unusable (negative, not finite: a provider's bug, not a limit)."""
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if 0.0 <= x < float("inf") else None


def _room(windows: list[_Window]) -> float:
    """What every one of `windows` can still admit (no expiry applied); unlimited without windows."""
    room = _INF
    for w in windows:
        r = w.limit - w.used
        if r < room:
            room = r
    return room


def _admit_last(windows: list[_Window], amount: float) -> None:
    """Add `amount` to each window's use and to its last entry (where admissions on credit merged)."""
    for w in windows:
        w.used += amount
        w.entries[-1][2] += amount


class Budget:
    """The rate budget of one (provider, model). See the module docstring for what it guarantees."""

    def __init__(self, limits: Limits, learn: bool = True) -> None:
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
        self.silent = 0  # answers without rate-limit headers in a row (see sync_headers)
        self.cooldown_until = 0.0
        self.counts_tokens = bool(self.tokens)
        self._limited = bool(self.requests or self.tokens)
        self._queued = 0
        self._lock: anyio.Lock | None = None
        self._changed: anyio.Event | None = None
        # Credit: the fast path of `pay_now` (see there). `_room_*` are lower bounds of what every window of the kind
        # can still admit (no expiry applied); `_acc_*` what was admitted on credit and is not in the windows yet.
        self._credit_until = 0.0
        self._ticket: list[list[float]] | None = None
        self._acc_req = 0.0
        self._acc_tok = 0.0
        self._room_req = 0.0
        self._room_tok = 0.0
        self._measure()

    # -- paying -------------------------------------------------------------------------------------------------

    def _fold(self) -> None:
        """End the credit: add what was admitted on it to the windows' use and to their last entries (the ones
        those admissions merged into: nothing adds an entry while credit runs)."""
        self._credit_until = 0.0
        self._ticket = None
        if self._acc_req:
            _admit_last(self.requests, self._acc_req)
            self._acc_req = 0.0
        if self._acc_tok:
            _admit_last(self.tokens, self._acc_tok)
            self._acc_tok = 0.0

    def _measure(self) -> None:
        """Recompute `_room_req`/`_room_tok` from the windows (after a fold, so nothing is pending)."""
        self._room_req = _room(self.requests)
        self._room_tok = _room(self.tokens)

    def _grant(self, now: float, ticket: list[list[float]] | None) -> None:
        """Open credit after an admission at `now`: until the end of the current merge interval of every window,
        payments that fit in the rooms are admitted by `pay_now` without looking at the windows, as additions to
        the entries this admission went into. Their expiry is moved to that of an admission at the interval's end
        (a later expiry: only ever stricter). No credit while a window is hot: paced admissions are spaced one by
        one."""
        until = _INF
        for w in self.requests + self.tokens:
            if now < w.hot_until or now < w.next_at:
                return
            end = w.entries[-1][0] + w.merge
            if end < until:
                until = end
        for w in self.requests + self.tokens:
            last = w.entries[-1]
            expiry = until + w.period + w.margin
            if expiry > last[1]:
                last[1] = expiry
        self._ticket = ticket
        self._credit_until = until

    def _try_pay(self, tokens: float) -> tuple[float, Any]:
        """Pay now and return (0.0, ticket), or pay nothing and return (seconds until the payment fits, None)."""
        now = _monotonic()
        self._fold()
        try:
            return self._try_pay_at(tokens, now)
        finally:
            self._measure()

    def _try_pay_at(self, tokens: float, now: float) -> tuple[float, Any]:
        if now < self.cooldown_until:
            return self.cooldown_until - now, None
        wait = 0.0
        for w in self.requests:
            if w.limit < 1.0:
                raise BudgetTooSmall(f"{w.name} limit {w.limit:g} is below one request")
            e = w.entries
            if e and e[0][1] <= now:  # expire() only when something leaves the window (it is a no-op otherwise)
                w.expire(now)
            if w.used + 1.0 > w.limit or now < w.next_at - PACE_SLACK:
                wait = max(wait, w.blocked(1.0, now))
        for w in self.tokens:
            if tokens > w.limit:
                raise BudgetTooSmall(
                    f"request needs about {int(tokens)} tokens, more than the whole {w.name} limit of {w.limit:g}")
            e = w.entries
            if e and e[0][1] <= now:
                w.expire(now)
            if w.used + tokens > w.limit or now < w.next_at - PACE_SLACK:
                wait = max(wait, w.blocked(tokens, now))
        if wait > 0.0:
            return wait, None
        for w in self.requests:
            w.add(1.0, now)
        ticket = [w.add(tokens, now) for w in self.tokens] if self.tokens else None
        self._grant(now, ticket)
        return 0.0, ticket

    def pay_now(self, tokens: float = 0.0) -> Any:
        """The fast path of `acquire` without a coroutine: a ticket (None when nothing is limited), or WAIT.

        Far from every limit (what most payments of a run far below its limits are), a payment is admitted on the
        credit the last full check opened (`_grant`): a few comparisons and additions instead of a walk of every
        window, for the same admissions."""
        if self._queued == 0:
            if not self._limited:
                return None
            if tokens <= self._room_tok and self._room_req >= 1.0 and _monotonic() < self._credit_until:
                self._room_req -= 1.0
                self._room_tok -= tokens
                self._acc_req += 1.0
                self._acc_tok += tokens
                return self._ticket
            wait, ticket = self._try_pay(tokens)
            if wait == 0.0:
                return ticket
        return WAIT

    async def acquire(self, tokens: float = 0.0) -> Any:
        """Pay one request and `tokens` to every window, waiting (first come, first served) until it fits.

        Returns a ticket for `settle`.
        """
        ticket = self.pay_now(tokens)
        if ticket is not WAIT:
            return ticket
        if self._lock is None:
            self._lock = anyio.Lock()
        self._queued += 1
        try:
            async with self._lock:
                while True:
                    wait, ticket = self._try_pay(tokens)
                    if wait == 0.0:
                        return ticket
                    self._changed = changed = anyio.Event()
                    with anyio.move_on_after(_ceil(wait * 1000.0) / 1000.0):  # whole ms: see PACE_SLACK
                        await changed.wait()
        finally:
            self._queued -= 1

    def settle(self, ticket: Any, reserved: float, used: float) -> None:
        """Correct the token windows by the difference between a reservation and the real usage."""
        if not ticket or used == reserved:
            return
        delta = used - reserved
        if ticket is self._ticket:
            # Its entries are those the credit's admissions go into: the correction waits with them for the fold.
            if delta < -reserved:
                delta = -reserved  # never take back more than this payment put in
            self._acc_tok += delta
            self._room_tok -= delta
            if delta < 0 and self._queued:
                self._wake()
            return
        now = _monotonic()
        for w, entry in zip(self.tokens, ticket):
            if entry[1] > now:  # still in the window
                if entry[2] + delta < 0.0:
                    delta = -entry[2]
                entry[2] += delta
                w.used += delta
        self._room_tok = _room(self.tokens) - self._acc_tok
        if delta < 0 and self._queued:
            self._wake()

    def widen_margins(self) -> None:
        """The provider refused what our windows admitted: allow more time between our clock and theirs."""
        self._credit_until = 0.0  # credit was granted with the old margins
        for w in self.requests + self.tokens:
            w.margin = min(w.margin * 2.0, w.period * 0.1)
            w.paced_margin = min(w.paced_margin * 2.0, w.period * 0.1)

    def token_headroom(self) -> float:
        """Tokens that fit in every token window right now without waiting (a lower bound: no expiry applied)."""
        return self._room_tok

    def cooldown(self, seconds: float) -> None:
        """Block every acquire until `seconds` from now (extends, never shortens, a running cooldown)."""
        until = _monotonic() + max(0.0, seconds)
        if until > self.cooldown_until:
            self.cooldown_until = until
        self._credit_until = 0.0  # no admission on credit during the cooldown
        self._limited = True  # from now on acquire checks the clock

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

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
                self._sync(False, _num(rem), _num(headers.get(names.requests_limit)),
                           headers.get(names.requests_reset))
            if rem_t is not None:
                self._sync(True, _num(rem_t), _num(headers.get(names.tokens_limit)), headers.get(names.tokens_reset))
            return
        # A provider either sends these on every answer or never: after 64 silent answers, stop looking
        # (a 429 looks again).
        self.silent += 1

    def _sync(self, tokens: bool, remaining: float | None, limit: float | None, reset: str | None) -> None:
        if remaining is None:
            return
        self._fold()  # the windows change below: credit ends, and the rooms are measured again at the end
        try:
            self._sync_window(tokens, remaining, limit, reset)
        finally:
            self._measure()

    def _sync_window(self, tokens: bool, remaining: float, limit: float | None, reset: str | None) -> None:
        windows = self.tokens if tokens else self.requests
        minute = None
        for w in windows:
            if w.period == 60.0:
                minute = w
                break
        if minute is None:
            if not (self.learn and limit):
                return
            minute = _Window("tpm" if tokens else "rpm", limit, 60.0, learned=True)
            windows.append(minute)
            self._limited = True
            if tokens:
                self.counts_tokens = True
        elif minute.learned and limit and limit != minute.limit:
            minute.limit = limit
        if limit is None:
            limit = minute.limit
        now = _monotonic()
        minute.expire(now)
        extra = (limit - remaining) - minute.used
        if extra >= 1.0:
            secs = parse_reset(reset) if reset else None
            ttl = minute.period if secs is None else min(secs, minute.period)
            entries = minute.entries
            entry = [now, now + ttl, extra]
            # Keep entries ordered by expiry (wait_for walks them in order).
            if entries and entries[-1][1] > entry[1]:
                i = len(entries)
                while i > 0 and entries[i - 1][1] > entry[1]:
                    i -= 1
                entries.insert(i, entry)
            else:
                entries.append(entry)
            minute.used += extra


class Limiter:
    """All budgets of an engine, one per (provider, model), created on first use from the configured limits."""

    def __init__(self, default: Limits, per_model: dict[str, Limits] | None = None, learn: bool = True) -> None:
        self.default = default
        self.per_model = per_model or {}
        self.learn = learn
        self._budgets: dict[tuple[str, str], Budget] = {}

    def budget(self, provider: str, model: str) -> Budget:
        key = (provider, model)
        b = self._budgets.get(key)
        if b is None:
            b = self._budgets[key] = Budget(self.per_model.get(model, self.default), self.learn)
        return b

