"""Pacing of a saturated rate window (tcia_async/engine/limits.py).

A window that starts full may let its whole limit go at once; once saturated, it must hand out freed capacity
spaced out (each admission alone at the provider), never more than `limit` in any rolling period, and without
losing more than one spread of time over the run. A window far above the demand must never be paced.

Most tests drive the budget on a fake clock: `_try_pay` returns the computed wait an `acquire` would sleep for,
and the test advances the clock by exactly that wait, so admission times are deterministic.
"""

from __future__ import annotations

import bisect
import time

import anyio
import anyio.lowlevel
import pytest

from tcia_async.config import Limits
from tcia_async.engine import limits as limits_mod
from tcia_async.engine.limits import PACE, PACE_SLACK, WAIT, Budget


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(limits_mod, "_monotonic", lambda: now[0])
    return now


def admit(b: Budget, clock: list[float], n: int, amounts=None) -> list[float]:
    """Admission times of `n` payments made as fast as the budget allows (each waits its computed time)."""
    times = []
    while len(times) < n:
        amount = amounts[len(times)] if amounts else 0.0
        wait, _ = b._try_pay(amount)
        if wait == 0.0:
            times.append(clock[0])
        else:
            assert wait > 0.0
            clock[0] += wait
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
    b = Budget(Limits(rps=limit))
    t0 = clock[0]
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
    b = Budget(Limits(rps=limit))
    times = admit(b, clock, 12 * limit)
    assert max_in_any_window(times, 1.0) <= limit
    # in steady state every period still admits the whole limit (less only the paced margin)
    w = b.requests[0]
    span = times[-1] - times[-limit * 5]
    assert span <= 5 * (1.0 + w.paced_margin) + 1e-6


def test_cold_window_is_never_paced(clock):
    # Limits far above the demand (what the engine benchmark configures): no admission ever waits.
    b = Budget(Limits(rpm=1e9, tpm=1e12))
    for _ in range(2000):
        assert b.pay_now(50.0) is not WAIT
    for w in b.requests + b.tokens:
        assert w.next_at == 0.0 and w.hot_until == 0.0


def test_token_window_paces_by_amount_and_settles(clock):
    limit = 1000.0
    b = Budget(Limits(tpm=limit))
    amounts = [300.0, 300.0, 300.0, 250.0, 100.0, 400.0, 50.0, 200.0, 300.0, 120.0] * 3
    times = admit(b, clock, len(amounts), amounts)
    assert max_in_any_window(times, 60.0, amounts) <= limit
    # after the first saturation, the gap after an admission of `a` tokens is at least a x PACE x period / limit
    first_wait = next(i for i in range(1, len(times)) if times[i] > times[0])
    assert_paced(times[first_wait:], [a * PACE * 60.0 / limit for a in amounts[first_wait:]])
    # settle still returns what a paced reservation did not use
    w = b.tokens[0]
    while True:
        wait, ticket = b._try_pay(100.0)
        if wait == 0.0:
            break
        clock[0] += wait
    before = w.used
    b.settle(ticket, 100.0, 40.0)
    assert w.used == pytest.approx(before - 60.0)


def test_window_cools_down_after_demand_stops(clock):
    limit = 10
    b = Budget(Limits(rps=limit))
    admit(b, clock, 3 * limit)  # saturated and paced
    clock[0] += 5.0  # idle for longer than a period: the window is empty and cold again
    t = clock[0]
    times = admit(b, clock, limit)
    assert times == [t] * limit  # a fresh burst is allowed again


@pytest.mark.anyio
async def test_waiters_are_paced_in_order_on_the_real_clock():
    limit = 10
    b = Budget(Limits(rps=limit))
    for _ in range(limit):
        await b.acquire()
    got: list[tuple[int, float]] = []

    async def one(i):
        await b.acquire()
        got.append((i, time.monotonic()))

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one, i)
            await anyio.lowlevel.checkpoint()
    assert [i for i, _ in got] == list(range(6))  # first come, first served
    ts = [t for _, t in got]
    gap = PACE * 1.0 / limit
    assert_paced(ts, [gap] * len(ts), tolerance=1e-4)  # each slept until its computed time


def test_admissions_on_credit_never_exceed_any_window(clock, monkeypatch):
    """`pay_now` admits payments on credit (without the full check) while the windows are cold, and the windows
    still hold: bursts of payments, each settled at once below its reservation, never put more than a limit in any
    rolling window, cold or paced."""
    import random

    rng = random.Random(7)
    b = Budget(Limits(rpm=3000, rps=200, tpm=150_000))
    checked = [0]  # admissions made by the full check (each opens credit)
    real_grant = b._grant

    def counted(now, ticket):
        checked[0] += 1
        real_grant(now, ticket)

    monkeypatch.setattr(b, "_grant", counted)
    times, used = [], []
    while len(times) < 4000:
        reserved = float(rng.randint(10, 200))
        ticket = b.pay_now(reserved)
        if ticket is WAIT:
            clock[0] += 0.001
            continue
        spent = reserved * rng.random()  # the real usage is settled at once, as an answer would
        b.settle(ticket, reserved, spent)
        times.append(clock[0])
        used.append(spent)
        # bursts of payments within a millisecond, with idle gaps that let the windows cool down again
        clock[0] += rng.random() * 0.0001 if rng.random() < 0.995 else rng.random() * 30.0
    on_credit = len(times) - checked[0]
    assert on_credit > len(times) / 4, on_credit
    assert max_in_any_window(times, 60.0) <= 3000
    assert max_in_any_window(times, 1.0) <= 200
    assert max_in_any_window(times, 60.0, used) <= 150_000 + 1e-6
    assert times[-1] - times[0] > 120.0  # long enough for the minute windows to fill and empty


def test_cooldown_and_header_sync_end_the_credit(clock):
    b = Budget(Limits(rpm=10))
    assert b.pay_now() is not WAIT  # a full check: opens credit
    b.cooldown(1.0)
    assert b.pay_now() is WAIT  # not admitted on the credit opened before the cooldown
    clock[0] += 1.0
    assert b.pay_now() is not WAIT
    # The provider reports the minute used up elsewhere: the next payment waits, credit or not.
    b.sync_headers({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "30s"})
    assert b.pay_now() is WAIT
