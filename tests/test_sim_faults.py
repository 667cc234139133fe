"""Each injected fault, as a raw HTTP client sees it, and the seeded mix of `error_rate`."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tcia_async.sim import SimConfig, Simulator
from tcia_async.sim.faults import FaultPlan

pytestmark = pytest.mark.anyio

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def send(sim, timeout: float = 5.0, body: dict = BODY):
    """(status, content type, body bytes) or the exception the client raised."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        try:
            async with s.post(sim.base_url + "/chat/completions", json=body) as r:
                return r.status, r.content_type, await r.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            return e


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors(anyio_backend, status):
    async with Simulator(SimConfig(**{f"rate_{status}": 1.0})) as sim:
        got, ctype, data = await send(sim)
        assert got == status and ctype == "application/json"
        assert orjson.loads(data)["error"]["type"] == "server_error"
        assert sim.stats()["by_status"] == {str(status): 1} and sim.stats()["ok"] == 0


async def test_connection_reset(anyio_backend):
    async with Simulator(SimConfig(rate_reset=1.0)) as sim:
        e = await send(sim)
        assert isinstance(e, aiohttp.ClientOSError) and "reset" in str(e).lower()
        s = sim.stats()
        assert s["faults"] == {"reset": 1} and s["by_status"] == {} and s["requests"] == 1


async def test_truncated_body(anyio_backend):
    async with Simulator(SimConfig(rate_truncated=1.0)) as sim:
        e = await send(sim)
        assert isinstance(e, aiohttp.ClientPayloadError)
        assert sim.stats()["faults"] == {"truncated": 1} and sim.stats()["ok"] == 0


async def test_non_json_body(anyio_backend):
    async with Simulator(SimConfig(rate_non_json=1.0)) as sim:
        status, ctype, data = await send(sim)
        assert status == 200 and ctype == "text/html"
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(data)
        assert sim.stats()["ok"] == 0 and sim.stats()["faults"] == {"non_json": 1}


async def test_hang_then_answer_outlasts_a_short_timeout(anyio_backend):
    async with Simulator(SimConfig(rate_hang=1.0, hang_s=0.5)) as sim:
        assert isinstance(await send(sim, timeout=0.1), asyncio.TimeoutError)
        status, _, data = await send(sim, timeout=5)  # a patient client gets the answer after the hang
        assert status == 200 and orjson.loads(data)["choices"]
        assert sim.stats()["faults"]["hang"] == 2


async def test_hang_then_close(anyio_backend):
    async with Simulator(SimConfig(rate_hang=1.0, hang_s=0.1, hang_then="close")) as sim:
        e = await send(sim)
        assert isinstance(e, aiohttp.ServerDisconnectedError)
        assert sim.stats()["ok"] == 0


async def test_error_rate_spreads_over_non_hang_kinds_and_is_seeded(anyio_backend):
    async def run(seed: int) -> tuple[list, dict]:
        async with Simulator(SimConfig(error_rate=0.5, seed=seed)) as sim:
            outcomes = []
            for i in range(200):
                r = await send(sim, body={**BODY, "max_tokens": 16 + i})
                outcomes.append(type(r).__name__ if isinstance(r, Exception) else (r[0], r[1]))
            return outcomes, sim.stats()

    a, stats = await run(1)
    b, _ = await run(1)
    c, _ = await run(2)
    assert a == b and a != c  # same seed, same faults in arrival order
    assert set(stats["faults"]) == {"500", "503", "reset", "truncated", "non_json"}
    assert 60 <= sum(stats["faults"].values()) <= 140
    assert stats["ok"] == 200 - sum(stats["faults"].values())


async def test_a_failed_body_can_succeed_when_retried(anyio_backend):
    async with Simulator(SimConfig(rate_500=0.5, seed=3)) as sim:
        statuses = [(await send(sim))[0] for _ in range(20)]
        assert 500 in statuses and 200 in statuses


def test_fault_rates_above_one_are_refused():
    with pytest.raises(ValueError):
        FaultPlan(SimConfig(error_rate=0.8, rate_hang=0.5))
