"""The engine driven the way a library user drives it with plain asyncio: `asyncio.run`, `asyncio.wait_for`,
`Task.cancel()` and Ctrl-C. A caller that goes away gets control back at once; the request it started goes on
and its answer is cached (never paid twice)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from tcia_async.config import EngineConfig
from tcia_async.engine import Engine
from tcia_async.records import BatchRequest
from tcia_async.sim import SimConfig, Simulator

EMB = "text-embedding-3-small"


def chat(text: str) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 8}


def test_embed_and_generate_work_under_asyncio_run():
    async def main():
        async with Simulator(SimConfig(batch_delay_s=None)) as sim:
            async with Engine(EngineConfig(base_url=sim.base_url)) as engine:
                vectors = await asyncio.wait_for(engine.embed(["one", "two"], model=EMB), 30)
                lines = [BatchRequest(custom_id="e", url="/v1/embeddings", body={"model": EMB, "input": "x"}),
                         BatchRequest(custom_id="c", body=chat("hi"))]
                results = [r async for r in engine.generate(lines)]
        return vectors, results

    vectors, results = asyncio.run(main())
    assert vectors.shape == (2, 384)
    assert sorted((r.custom_id, r.response.status_code) for r in results) == [("c", 200), ("e", 200)]


def test_an_asyncio_timeout_returns_at_once_and_the_answer_is_kept(tmp_path):
    async def main():
        async with Simulator(SimConfig(latency_ms=1000, batch_delay_s=None)) as sim:
            cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))
            async with Engine(cfg) as engine:
                try:
                    await asyncio.wait_for(engine.chat(chat("slow")), 0.05)
                except asyncio.TimeoutError:
                    timed_out = True
                on_wire = engine.stats.in_flight  # the caller is back while its request is on the wire
                task = asyncio.ensure_future(engine.chat(chat("cancelled")))
                await sim.wait_requests(2)
                task.cancel()
                # The first request is still in flight: a new caller waits for it instead of paying again.
                joined = await engine.chat(chat("slow"))
            # Leaving the engine let the cancelled caller's request finish and cached it.
            async with Engine(cfg) as engine:
                replayed = [await engine.chat(chat("slow")), await engine.chat(chat("cancelled"))]
                sent_again = engine.stats.sent
            return timed_out, on_wire, task.cancelled(), joined, replayed, sent_again, sim.stats()["requests"]

    timed_out, on_wire, cancelled, joined, replayed, sent_again, requests = asyncio.run(main())
    assert timed_out and on_wire == 1 and cancelled
    assert replayed[0] == joined and replayed[1]["choices"]
    assert sent_again == 0 and requests == 2  # each request paid once


def test_ctrl_c_during_a_chat_interrupts_at_once(tmp_path):
    script = tmp_path / "chat.py"
    script.write_text(textwrap.dedent("""
        import asyncio
        from tcia_async.config import EngineConfig
        from tcia_async.engine import Engine
        from tcia_async.sim import SimConfig, Simulator

        async def announce(sim):
            await sim.wait_requests(1)
            print("on the wire", flush=True)

        async def main():
            async with Simulator(SimConfig(latency_ms=120_000, batch_delay_s=None)) as sim:
                async with Engine(EngineConfig(base_url=sim.base_url)) as engine:
                    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
                    asyncio.ensure_future(announce(sim))
                    await engine.chat(body)

        asyncio.run(main())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "on the wire"
        proc.send_signal(signal.SIGINT)
        # The answer would take two minutes: a Ctrl-C that waited for it would run out this timeout.
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err


def test_leaving_the_engine_does_not_wait_for_an_open_generate_or_queued_local_batches():
    class Slow:
        identity = "slow-v1"
        calls = 0

        def embed(self, texts):
            Slow.calls += 1
            time.sleep(0.2)
            return np.zeros((len(texts), 4), dtype=np.float32)

    async def main():
        async with Simulator(SimConfig(latency_ms=10, batch_delay_s=None)) as sim:
            lines = [BatchRequest(custom_id=f"r{i}", body=chat(f"q{i}")) for i in range(300)]
            async with Engine(EngineConfig(base_url=sim.base_url, concurrency=4), local_models={"slow": Slow()}
                              ) as engine:
                gen = engine.generate(lines)
                async for _ in gen:
                    break  # kept, not closed: its workers fill the result queue and wait for a reader
                try:
                    await asyncio.wait_for(engine.embed([f"t{i}" for i in range(32 * 10)], model="slow"), 0.05)
                except asyncio.TimeoutError:
                    pass
            await gen.aclose()
        return Slow.calls

    # Before, the first case never left the block; the second ran all ten batches of the local model.
    calls = asyncio.run(asyncio.wait_for(main(), 60))
    assert calls <= 2


def test_closing_generate_early_caches_what_is_on_the_wire_and_a_sharing_caller_still_gets_its_answer(tmp_path):
    async def main():
        async with Simulator(SimConfig(latency_ms=300, batch_delay_s=None)) as sim:
            cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"), concurrency=8)
            lines = [BatchRequest(custom_id=f"r{i}", body=chat(f"q{i}")) for i in range(8)]
            async with Engine(cfg) as engine:
                gen = engine.generate(lines)
                first = asyncio.ensure_future(gen.__anext__())  # starts the run
                await sim.wait_requests(8)  # every line on the wire
                shared = asyncio.ensure_future(engine.chat(chat("q0")))  # joins line r0's request
                await asyncio.sleep(0)
                first = await first
                await gen.aclose()  # the other lines' answers are on their way
                answer = await shared
            async with Engine(cfg) as engine:
                results = [r async for r in engine.generate(lines)]
                sent_again = engine.stats.sent
        return first, answer, results, sent_again, sim.stats()["requests"]

    first, answer, results, sent_again, requests = asyncio.run(main())
    assert first.response.status_code == 200 and answer["choices"]
    assert len(results) == 8 and sent_again == 0 and requests == 8  # nothing paid twice


def test_a_caller_leaving_as_its_request_gets_a_slot_sends_nothing(monkeypatch):
    """The last caller's cancellation and the slot's release land in one turn of the loop: the engine's task
    resumes before the cancellation reaches it, and must not write the request."""
    from tcia_async.engine import client

    gate: asyncio.Event | None = None
    real_post = client.Transport.post

    async def post(self, url, data):
        if b'"content":"X"' in data:  # answered as soon as the gate opens: the slot is free in that same turn
            await gate.wait()
            return 200, {}, b'{"choices":[{"message":{"role":"assistant","content":"x"}}],"usage":{}}'
        return await real_post(self, url, data)

    monkeypatch.setattr(client.Transport, "post", post)

    async def main():
        nonlocal gate
        gate = asyncio.Event()
        async with Simulator(SimConfig(batch_delay_s=None, record_bodies=16)) as sim:
            async with Engine(EngineConfig(base_url=sim.base_url, concurrency=1)) as engine:
                await engine.chat(chat("warm"))  # an open connection: K would be written before any wait
                x = asyncio.ensure_future(engine.chat(chat("X")))
                await asyncio.sleep(0.05)  # X holds the only slot
                a = asyncio.ensure_future(engine.chat(chat("K")))
                await asyncio.sleep(0.05)  # K's task waits for the slot
                asyncio.get_running_loop().call_soon(lambda: (gate.set(), a.cancel()))
                await x
                await asyncio.gather(a, return_exceptions=True)
                await asyncio.sleep(0.1)
                k_sent = [b for b in sim.bodies() if b["messages"][0]["content"] == "K"]
                await engine.chat(chat("K"))  # a new caller sends it
                total = [b for b in sim.bodies() if b["messages"][0]["content"] == "K"]
        return len(k_sent), len(total), a.cancelled()

    k_sent, total, cancelled = asyncio.run(main())
    assert cancelled and k_sent == 0 and total == 1
