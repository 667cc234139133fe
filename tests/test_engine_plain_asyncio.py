"""The engine driven the way a library user drives it with plain asyncio: `asyncio.run`, `asyncio.wait_for`,
`Task.cancel()` and Ctrl-C. A caller that goes away gets control back at once; the request it started goes on
and its answer is cached (never paid twice)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

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
