"""Edge behaviour a user relies on: halting sends nothing more, odd server hints, budgets and partial failures."""

from __future__ import annotations

import anyio
import pytest

from tcia_async.config import EngineConfig, Limits
from tcia_async.engine import Engine, NotSent, RequestFailed
from tcia_async.engine.limits import Limiter
from tcia_async.engine.retry import retry_after
from tcia_async.sim import SimConfig, Simulator

EMB = "text-embedding-3-small"


def chat(text: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.anyio
async def test_halt_sends_nothing_more_and_waiting_requests_raise_not_sent(tmp_path):
    async with Simulator(SimConfig(latency_ms=20, batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"), concurrency=10,
                           limits=Limits(rps=2))
        outcomes: list[str] = []
        async with Engine(cfg) as engine:

            async def one(i: int) -> None:
                try:
                    await engine.chat(chat(f"q{i}"))
                    outcomes.append("answered")
                except NotSent:
                    outcomes.append("not sent")

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(one, i)
                await sim.wait_requests(2)  # the first window's two requests are out; eight wait for budget
                engine.halt()
            with pytest.raises(NotSent):
                await engine.chat(chat("after the halt"))
        assert sorted(outcomes) == ["answered"] * 2 + ["not sent"] * 8
        assert sim.stats()["requests"] == 2


def test_retry_after_hints_that_are_no_hints():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    for bad in ("0", "-3", "inf", "nan", "1e400"):
        assert retry_after({"retry-after": bad}) is None, bad
    assert retry_after({"retry-after-ms": "0"}) is None


def test_header_limits_that_are_not_counts_are_ignored():
    for bad in ("-5", "nan", "inf"):
        budget = Limiter(Limits()).budget("p", "m")
        budget.sync_headers({"x-ratelimit-limit-requests": bad, "x-ratelimit-remaining-requests": "3"})
        assert all(0 < w.limit < float("inf") for w in budget.requests), bad


@pytest.mark.anyio
async def test_a_guessed_answer_length_never_makes_a_request_too_large(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        # 200 tokens a minute: the prompt fits; the default guess of the answer's length alone would not.
        cfg = EngineConfig(base_url=sim.base_url, limits=Limits(tpm=200))
        async with Engine(cfg) as engine:
            answer = await engine.chat(chat("Say hi."))
        assert answer["choices"][0]["message"]["content"]
        # An explicit max_tokens over the whole budget is still refused before sending.
        async with Engine(cfg) as engine:
            with pytest.raises(RequestFailed) as info:
                await engine.chat(chat("Say hi.", max_tokens=500))
        assert info.value.error.code == "exceeds_budget"


@pytest.mark.anyio
async def test_embed_keeps_the_answers_it_paid_for_when_another_text_fails(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"), limits=Limits(tpm=100))
        async with Engine(cfg) as engine:
            with pytest.raises(RequestFailed):
                await engine.embed(["word " * 300, "good text one", "good text two"], model=EMB)
        paid = sim.stats()["ok"]
        assert paid >= 1
        async with Engine(cfg) as engine:
            vectors = await engine.embed(["good text one", "good text two"], model=EMB)
            assert engine.stats.sent == 0
        assert vectors.shape[0] == 2
        assert sim.stats()["ok"] == paid


@pytest.mark.anyio
async def test_an_unreachable_provider_stops_the_run_instead_of_failing_every_request():
    import socket

    from tcia_async.engine import RunStopped

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = EngineConfig(base_url=f"http://127.0.0.1:{port}/v1", unreachable_after=0.3, backoff_base=0.05,
                       backoff_cap=0.1, max_attempts=1000)
    async with Engine(cfg) as engine:
        with pytest.raises(RunStopped, match="no connection to the provider"):
            await engine.chat(chat("hello"))
        with pytest.raises(RunStopped):  # the run stays stopped: nothing more is tried
            await engine.chat(chat("again"))
    assert engine.stats.ok == 0
