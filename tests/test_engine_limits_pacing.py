"""Pacing of a saturated rate window (tcia_async/engine/limits.py).

A window that starts full may let its whole limit go at once; once saturated, it must hand out freed capacity
spaced out (each admission alone at the provider), never more than `limit` in any rolling period, and without
losing more than one spread of time over the run. A window far above the demand must never be paced.

The budget runs on a fake clock (tests/fakeclock.py): `try_pay` returns the computed wait an `acquire` would
sleep for and the test advances the clock by exactly that wait, or `acquire` sleeps in fake time, so admission
times are deterministic.
"""

from __future__ import annotations

import bisect

import anyio
import anyio.lowlevel
import pytest

from fakeclock import FakeClock
from tcia_async.config import Limits
from tcia_async.engine.limits import PACE, PACE_SLACK, Budget


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def clock():
    return FakeClock()


def admit(b: Budget, clock: FakeClock, n: int, amounts=None) -> list[float]:
    """Admission times of `n` payments made as fast as the budget allows (each waits its computed time)."""
    times = []
    while len(times) < n:
        amount = amounts[len(times)] if amounts else 0.0
        wait, _ = b.try_pay(amount)
        if wait == 0.0:
            times.append(clock.t)
        else:
            assert wait > 0.0
            clock.advance(wait)
    return times


def assert_paced(times: list[float], gaps: list[float], tolerance: float = 1e-9) -> None:
    """Between admissions i < j at least the sum of the paced gaps of i..j-1 passed, less PACE_SLACK (GCRA)."""
    for i in range(len(times)):
        need = 0.0
        for j in range(i + 1, len(times)):
            need += gaps[j - 1]
            assert times[j] - times[i] >= need - PACE_SLACK - tolerance, (i, j)


def max_in_any_window(times: list[float], period: float, amounts=None) -> float:
    """The largest amount admitted in any half-open window (t - period, t]."""
    amounts = amounts or [1.0] * len(times)
    best = 0.0
    for i, t in enumerate(times):
        lo = bisect.bisect_right(times, t - period)
        best = max(best, sum(amounts[lo:i + 1]))
    return best


def test_first_window_bursts_then_admissions_are_paced(clock):
    limit = 20
    b = Budget(Limits(rps=limit), clock=clock)
    t0 = clock.t
    times = admit(b, clock, 5 * limit)
    assert times[:limit] == [t0] * limit  # it starts full: the whole limit at once
    gap = PACE * 1.0 / limit
    later = times[limit:]
    assert_paced(later, [gap] * len(later))  # paced: one at a time on average
    assert later[0] >= t0 + 1.0  # the first window's admissions had to leave first
    assert max_in_any_window(times, 1.0) <= limit
    # Pacing costs one spread of the freed window, once, not a spread per window: 4 more windows end within
    # 4 x (period + margin) plus one spread of limit x gap.
    w = b.requests[0]
    assert times[-1] - t0 <= 4 * (1.0 + w.margin) + limit * gap + 1e-6


def test_paced_steady_state_never_exceeds_limit_and_keeps_the_rate(clock):
    limit = 50
    b = Budget(Limits(rps=limit), clock=clock)
    times = admit(b, clock, 12 * limit)
    assert max_in_any_window(times, 1.0) <= limit
    # in steady state every period still admits the whole limit (less only the paced margin)
    w = b.requests[0]
    span = times[-1] - times[-limit * 5]
    assert span <= 5 * (1.0 + w.paced_margin) + 1e-6


def test_cold_window_is_never_paced(clock):
    # Limits far above the demand (what the engine benchmark configures): no admission ever waits.
    b = Budget(Limits(rpm=1e9, tpm=1e12), clock=clock)
    for _ in range(2000):
        assert b.try_pay(50.0)[0] == 0.0
    for w in b.requests + b.tokens:
        assert w.next_at == 0.0 and w.hot_until == 0.0


def test_token_window_paces_by_amount_and_settles(clock):
    limit = 1000.0
    b = Budget(Limits(tpm=limit), clock=clock)
    amounts = [300.0, 300.0, 300.0, 250.0, 100.0, 400.0, 50.0, 200.0, 300.0, 120.0] * 3
    times = admit(b, clock, len(amounts), amounts)
    assert max_in_any_window(times, 60.0, amounts) <= limit
    # after the first saturation, the gap after an admission of `a` tokens is at least a x PACE x period / limit
    first_wait = next(i for i in range(1, len(times)) if times[i] > times[0])
    assert_paced(times[first_wait:], [a * PACE * 60.0 / limit for a in amounts[first_wait:]])
    # settle still returns what a paced reservation did not use
    w = b.tokens[0]
    while True:
        wait, ticket = b.try_pay(100.0)
        if wait == 0.0:
            break
        clock.advance(wait)
    before = w.used
    b.settle(ticket, 100.0, 40.0)
    assert w.used == pytest.approx(before - 60.0)


def test_window_cools_down_after_demand_stops(clock):
    limit = 10
    b = Budget(Limits(rps=limit), clock=clock)
    admit(b, clock, 3 * limit)  # saturated and paced
    clock.advance(5.0)  # idle for longer than a period: the window is empty and cold again
    t = clock.t
    times = admit(b, clock, limit)
    assert times == [t] * limit  # a fresh burst is allowed again


@pytest.mark.anyio
async def test_waiters_sleep_their_computed_time_and_are_served_in_order(clock):
    limit = 10
    b = Budget(Limits(rps=limit), clock=clock)
    got: list[tuple[int, float]] = []

    async def one(i):
        await b.acquire()
        got.append((i, clock.now()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        t0 = clock.now()
        for _ in range(limit):
            await b.acquire()
        assert clock.now() == t0  # it starts full: the whole limit at once
        async with anyio.create_task_group() as waiters:
            for i in range(6):
                waiters.start_soon(one, i)
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert [i for i, _ in got] == list(range(6))  # first come, first served
    ts = [t for _, t in got]
    assert ts[0] >= t0 + 1.0  # the first window's admissions had to leave first
    assert_paced(ts, [PACE * 1.0 / limit] * len(ts), tolerance=1e-6)  # each slept until its computed time


@pytest.mark.anyio
async def test_a_higher_priority_waiter_goes_first(clock):
    b = Budget(Limits(rps=1), clock=clock)
    order: list[str] = []

    async def one(name, priority):
        await b.acquire(priority=priority)
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        await b.acquire()  # the window is full now
        async with anyio.create_task_group() as waiters:
            for name in ("early-0", "early-1", "early-2"):
                waiters.start_soon(one, name, 0)
                await anyio.lowlevel.checkpoint()
            waiters.start_soon(one, "later-stage", 5)
        tg.cancel_scope.cancel()
    assert order == ["later-stage", "early-0", "early-1", "early-2"]


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_is_served(clock):
    b = Budget(Limits(rps=1), clock=clock)
    served: list[str] = []

    async def one(name):
        await b.acquire()
        served.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        await b.acquire()
        async with anyio.create_task_group() as waiters:
            with anyio.CancelScope() as first:
                waiters.start_soon(one, "second")
                await anyio.lowlevel.checkpoint()
                first.cancel()
                await b.acquire()  # cancelled while first in line
            served.append("never")
        tg.cancel_scope.cancel()
    assert served == ["never", "second"] or served == ["second", "never"]
    assert not b._waiters


def test_restamp_moves_an_admission_to_its_real_departure(clock):
    b = Budget(Limits(rps=2), clock=clock)
    _, first = b.try_pay()
    clock.advance(0.9)
    b.restamp(first)  # it left only now (it waited for a connection slot)
    _, second = b.try_pay()
    clock.advance(0.2)  # 1.1 s after the first admission, 0.2 s after it left
    wait, _ = b.try_pay()
    assert wait > 0.0  # both still count: the provider saw them within the last second
    clock.advance(wait)
    assert b.try_pay()[0] == 0.0


def test_cooldown_and_header_sync_block_payments(clock):
    b = Budget(Limits(rpm=10), clock=clock)
    assert b.try_pay()[0] == 0.0
    b.cooldown(1.0)
    assert b.try_pay()[0] == pytest.approx(1.0)
    clock.advance(1.0)
    assert b.try_pay()[0] == 0.0
    # The provider reports the minute used up elsewhere: the next payment waits until its reset.
    b.sync_headers({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "30s"})
    assert b.try_pay()[0] == pytest.approx(30.0)


def test_a_burst_counts_from_its_arrival_a_paced_admission_from_its_admission(clock):
    """A burst (a fresh window) reaches the provider spread out; once answered, its admissions count from the
    middle of their time on the wire, so the next paced request cannot land inside the provider's window of the
    burst's last arrivals. A paced admission keeps its time."""
    limit = 10
    b = Budget(Limits(rps=limit), clock=clock)
    t0 = clock.t
    tickets = [b.try_pay()[1] for _ in range(limit)]  # the whole window at once
    clock.advance(0.3)
    for t in tickets:
        b.answered(t, wire_s=0.3)  # answered 300 ms after the send: arrived by 150 ms, by our estimate
    wait, _ = b.try_pay()
    assert clock.t + wait >= t0 + 0.15 + 1.0  # not before a second after the estimated arrival
    clock.advance(wait)
    _, paced = b.try_pay()  # the window is hot now: this one is paced
    expiry = paced[0][1][1]
    clock.advance(0.5)
    b.answered(paced, wire_s=0.5)
    assert paced[0][1][1] == expiry  # unchanged
