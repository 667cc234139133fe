"""Rate limits: 429s with OpenAI's body and headers exactly when a window is full, and none below."""

from __future__ import annotations

import re

import asyncio
import json
import time
from datetime import datetime

import aiohttp
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcia_async.sim import SimConfig, Simulator
from tcia_async.sim.limits import Limits, Window, go_duration

pytestmark = pytest.mark.anyio


def body(i: int = 0, max_tokens: int = 10, text: str = "hello") -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{text} {i}"}], "max_tokens": max_tokens}


async def post(session: aiohttp.ClientSession, sim, b: dict):
    async with session.post(sim.base_url + "/chat/completions", json=b) as r:
        return r.status, r.headers, await r.json()


async def test_rpm_429_body_and_headers_exactly_at_the_limit(anyio_backend):
    async with Simulator(SimConfig(rpm=5, tpm=10_000)) as sim, aiohttp.ClientSession() as s:
        remaining = []
        for i in range(5):
            status, h, _ = await post(s, sim, body(i))
            assert status == 200
            assert h["x-ratelimit-limit-requests"] == "5" and h["x-ratelimit-limit-tokens"] == "10000"
            remaining.append(int(h["x-ratelimit-remaining-requests"]))
            assert h["x-ratelimit-reset-requests"].endswith("s")
        assert remaining == [4, 3, 2, 1, 0]
        status, h, b = await post(s, sim, body(99))
        assert status == 429
        err = b["error"]
        assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded" and err["param"] is None
        assert "Rate limit reached" in err["message"] and "(RPM)" in err["message"]
        assert 0 < int(h["retry-after-ms"]) <= 60_000 and 1 <= int(h["retry-after"]) <= 60
        assert h["x-ratelimit-remaining-requests"] == "0"
        reset = re.fullmatch(r"(?:(\d+)m)?(\d+(?:\.\d+)?)s|(\d+)ms", h["x-ratelimit-reset-requests"])
        assert reset is not None, h["x-ratelimit-reset-requests"]  # a Go duration: 1m0s, 59.9s, 12ms
        minutes, seconds, millis = reset.groups()
        secs = int(millis) / 1000 if millis else int(minutes or 0) * 60 + float(seconds)
        assert 59 <= secs <= 60  # the whole minute window, less the moments since the first request
        for key in ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"):
            assert key in h
        stats = sim.stats()
        assert stats["by_status"] == {"200": 5, "429": 1} and stats["rate_limited"] == {"requests": 1}


async def test_tpm_counts_prompt_plus_max_tokens(anyio_backend):
    async with Simulator(SimConfig(tpm=200)) as sim, aiohttp.ClientSession() as s:
        status, h, b = await post(s, sim, body(0, max_tokens=100))
        assert status == 200
        prompt = b["usage"]["prompt_tokens"]
        assert int(h["x-ratelimit-remaining-tokens"]) == 200 - prompt - 100  # max_tokens, not the completion
        assert "x-ratelimit-limit-requests" not in h  # no RPM configured: no request headers
        status, h, b = await post(s, sim, body(1, max_tokens=100))
        assert status == 429
        assert b["error"]["type"] == "tokens" and b["error"]["code"] == "rate_limit_exceeded"
        assert "(TPM)" in b["error"]["message"]
        assert int(h["retry-after-ms"]) > 0
        # A request that still fits goes through.
        status, _, _ = await post(s, sim, body(2, max_tokens=200 - 2 * prompt - 100 - 5))
        assert status == 200


async def test_request_too_large_is_refused_and_costs_nothing(anyio_backend):
    async with Simulator(SimConfig(tpm=100)) as sim, aiohttp.ClientSession() as s:
        status, h, b = await post(s, sim, body(0, max_tokens=500))
        assert status == 429
        assert "Request too large" in b["error"]["message"]
        assert b["error"]["code"] == "rate_limit_exceeded" and b["error"]["type"] == "tokens"
        assert "retry-after" not in h  # waiting cannot help
        status, _, _ = await post(s, sim, body(1, max_tokens=50))
        assert status == 200
        assert sim.stats()["rate_limited"] == {"too_large": 1}


async def test_no_429_below_the_limits_even_concurrently(anyio_backend):
    async with Simulator(SimConfig(rpm=60, tpm=60 * 40, rps=60)) as sim, aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(post(s, sim, body(i, max_tokens=20)) for i in range(60)))
        assert [r[0] for r in results] == [200] * 60
        assert sim.stats()["by_status"] == {"200": 60}
        status, _, _ = await post(s, sim, body(60))
        assert status == 429


async def test_rps_window_rolls_after_retry_after_ms(anyio_backend):
    async with Simulator(SimConfig(rps=3)) as sim, aiohttp.ClientSession() as s:
        for i in range(3):
            assert (await post(s, sim, body(i)))[0] == 200
        status, h, b = await post(s, sim, body(3))
        assert status == 429 and b["error"]["type"] == "requests" and "(RPS)" in b["error"]["message"]
        wait_ms = int(h["retry-after-ms"])
        assert 0 < wait_ms <= 1000
        await asyncio.sleep(wait_ms / 1000)  # the computed deadline the server gave
        assert (await post(s, sim, body(4)))[0] == 200


async def test_openai_sdk_sees_rate_limit_error(anyio_backend):
    async with Simulator(SimConfig(rpm=1)) as sim:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
            await c.chat.completions.create(**body(0))
            with pytest.raises(openai.RateLimitError) as e:
                await c.chat.completions.create(**body(1))
    assert e.value.code == "rate_limit_exceeded"
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"


async def test_anthropic_style_headers(anyio_backend):
    async with Simulator(SimConfig(rpm=2, tpm=1000, headers="anthropic")) as sim, aiohttp.ClientSession() as s:
        status, h, _ = await post(s, sim, body(0))
        assert status == 200
        assert h["anthropic-ratelimit-requests-limit"] == "2"
        assert h["anthropic-ratelimit-requests-remaining"] == "1"
        reset = datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"])
        assert 55 <= reset.timestamp() - time.time() <= 61
        assert "anthropic-ratelimit-tokens-reset" in h and "x-ratelimit-limit-requests" not in h
        await post(s, sim, body(1))
        status, h, _ = await post(s, sim, body(2))
        assert status == 429 and int(h["retry-after"]) >= 1 and "retry-after-ms" not in h


async def test_no_headers_option(anyio_backend):
    async with Simulator(SimConfig(rpm=1, headers="none")) as sim, aiohttp.ClientSession() as s:
        _, h, _ = await post(s, sim, body(0))
        assert not any(k.lower().startswith(("x-ratelimit", "anthropic-ratelimit")) for k in h)
        status, h, b = await post(s, sim, body(1))
        assert status == 429 and b["error"]["code"] == "rate_limit_exceeded"
        assert "retry-after" not in h and "retry-after-ms" not in h


async def test_insufficient_quota_after_n_requests(anyio_backend):
    async with Simulator(SimConfig(quota_after=2)) as sim:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
            for i in range(2):
                await c.chat.completions.create(**body(i))
            with pytest.raises(openai.RateLimitError) as e:
                await c.chat.completions.create(**body(2))
    assert e.value.code == "insufficient_quota"
    assert json.loads(e.value.response.text)["error"]["type"] == "insufficient_quota"
    async with Simulator(SimConfig(quota_after=0)) as sim, aiohttp.ClientSession() as s:
        status, _, b = await post(s, sim, body(0))
        assert status == 429 and b["error"]["code"] == "insufficient_quota"


def test_go_durations():
    assert [go_duration(x) for x in (0, 0.0004, 0.012, 1, 1.5, 59.9994, 60, 360, 3723)] == [
        "0s", "1ms", "12ms", "1s", "1.5s", "1m0s", "1m0s", "6m0s", "1h2m3s"]


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(0, 0.4), min_size=1, max_size=200), limit=st.integers(1, 20),
       amounts=st.lists(st.integers(1, 5), min_size=200, max_size=200))
def test_window_never_admits_more_than_the_limit_in_any_true_window(gaps, limit, amounts):
    w = Window(limit * 3, 1.0)
    t = 0.0
    admitted: list[tuple[float, int]] = []
    for gap, amount in zip(gaps, amounts, strict=False):
        t += gap
        w.expire(t)
        if w.fits(amount):
            w.add(amount, t)
            admitted.append((t, amount))
        else:
            assert w.wait_for(amount, t) > 0
    for t0, _ in admitted:  # every window (t0 - 1, t0] holds at most the limit
        assert sum(a for t1, a in admitted if t0 - 1.0 < t1 <= t0) <= limit * 3


def test_limits_admit_reports_the_binding_window():
    lim = Limits(rpm=None, tpm=100, rps=2)
    assert lim.admit(10, 0.0).ok and lim.admit(10, 0.1).ok
    v = lim.admit(10, 0.2)
    assert not v.ok and v.kind == "requests" and abs(v.retry_after - 0.8) < 1e-9
    v = lim.admit(90, 1.5)
    assert not v.ok and v.kind == "tokens" and abs(v.retry_after - 58.5) < 1e-9
    assert lim.admit(500, 2.0).too_large


def test_bucket_mode_bursts_to_the_limit_then_refills_steadily():
    lim = Limits(rpm=60, tpm=None, rps=None, mode="bucket")
    t0 = 1000.0
    assert all(lim.admit(1, t0).ok for _ in range(60))  # starts full
    v = lim.admit(1, t0)
    assert not v.ok and abs(v.retry_after - 1.0) < 1e-9  # one request refills per second
    assert not lim.admit(1, t0 + 0.99).ok
    assert lim.admit(1, t0 + 1.0).ok
    # Steady state: exactly the refill rate gets through, never more.
    admitted = sum(lim.admit(1, t0 + 1.0 + k * 0.25).ok for k in range(1, 401))
    assert admitted == 100


async def test_bucket_mode_headers_and_429(anyio_backend):
    async with Simulator(SimConfig(rpm=3, limit_mode="bucket")) as sim, aiohttp.ClientSession() as s:
        for i in range(3):
            status, h, _ = await post(s, sim, body(i))
            assert status == 200 and int(h["x-ratelimit-remaining-requests"]) == 2 - i
        status, h, b = await post(s, sim, body(3))
        assert status == 429 and b["error"]["type"] == "requests"
        assert 19_000 <= int(h["retry-after-ms"]) <= 20_000  # 60 s / 3 per request


async def test_each_model_has_its_own_limits(anyio_backend):
    async with Simulator(SimConfig(rpm=1)) as sim, aiohttp.ClientSession() as s:
        assert (await post(s, sim, {**body(0), "model": "a"}))[0] == 200
        assert (await post(s, sim, {**body(1), "model": "b"}))[0] == 200
        assert (await post(s, sim, {**body(2), "model": "a"}))[0] == 429
        async with s.post(sim.base_url + "/embeddings", json={"model": "e", "input": "x"}) as r:
            assert r.status == 200
        sim.reset()  # clears the windows too
        assert (await post(s, sim, {**body(3), "model": "a"}))[0] == 200
