"""The Engine's Python API against the simulator: cache, limits, retries, classification, packing, stops."""

from __future__ import annotations

from typing import Annotated

import msgspec
import pytest

from tcia_async.config import EngineConfig, Limits
from tcia_async.engine import Engine, RequestFailed, RunStopped
from tcia_async.records import BatchRequest, Decomposition
from tcia_async.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"


def chat(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def cfg(sim, tmp_path, **kw) -> EngineConfig:
    kw.setdefault("cache_path", str(tmp_path / "cache.db"))
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_cap", 0.05)
    return EngineConfig(base_url=sim.base_url, **kw)


async def test_chat_is_cached_and_replayed_without_network(sim, tmp_path):
    async with Engine(cfg(sim, tmp_path)) as e:
        a = await e.chat(chat("hello"))
        assert a["choices"][0]["message"]["content"].startswith("[simulated]")
        b = await e.chat(chat("hello"))
        assert a == b
        c = await e.chat(chat("hello"), sample=1)  # another sample is another request
    assert sim.stats()["requests"] == 2
    async with Engine(cfg(sim, tmp_path)) as e:  # a new process-like start: answers come from disk
        assert await e.chat(chat("hello"), sample=1) == c
        assert e.stats.cached == 1 and e.stats.sent == 0
    assert sim.stats()["requests"] == 2


async def test_identical_requests_in_flight_share_one_call(tmp_path):
    import anyio

    async with Simulator(SimConfig(latency_ms=50, batch_delay_s=None)) as sim:
        async with Engine(cfg(sim, tmp_path)) as e:
            results = []

            async def one():
                results.append(await e.chat(chat("same")))

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
        assert sim.stats()["requests"] == 1
        assert all(r == results[0] for r in results)


class NeverMatched(msgspec.Struct):
    # The simulator does not honour `pattern`: its answers never decode, so every attempt fails.
    code: Annotated[str, msgspec.Meta(pattern="^xxxxx-never$")]


async def test_chat_json_returns_the_type_and_retries_with_the_error(tmp_path):
    body = chat("Decompose this instruction.\n<instruction>Summarise the text. Use at most 50 words.</instruction>")
    async with Simulator(SimConfig(batch_delay_s=None, record_bodies=100)) as sim:
        async with Engine(cfg(sim, tmp_path, schema_attempts=3)) as e:
            d = await e.chat_json(body, Decomposition, schema_name="tcia_decompose")
            assert isinstance(d, Decomposition) and d.complex is True and d.tasks  # a typed answer
            with pytest.raises(RequestFailed) as info:
                await e.chat_json(body, NeverMatched)
            assert info.value.error.code == "schema_mismatch"
            assert info.value.error.attempts == 3 and "NeverMatched" in info.value.error.message
        assert sim.stats()["requests"] == 4
        # The second and third attempts carried the bad answer and what was wrong with it.
        asked = [b for b in sim.bodies() if b["response_format"]["json_schema"]["name"] == "NeverMatched"]
        assert [len(b["messages"]) for b in asked] == [1, 3, 5]
        follow_up = asked[1]["messages"][2]["content"]
        assert "does not match the required JSON schema" in follow_up and "xxxxx-never" in follow_up
        # A rerun replays the same decisions from the cache: nothing is sent.
        async with Engine(cfg(sim, tmp_path, schema_attempts=3)) as e:
            with pytest.raises(RequestFailed):
                await e.chat_json(body, NeverMatched)
            assert e.stats.sent == 0


async def test_embed_packs_concurrent_calls_and_unpacks_in_order(sim, tmp_path):
    import anyio
    import numpy as np

    texts = [f"text number {i}" for i in range(40)]
    async with Engine(cfg(sim, tmp_path, embedding_batch_size=16)) as e:
        out: dict[int, np.ndarray] = {}

        async def one(i):
            out[i] = await e.embed(texts[i * 10:(i + 1) * 10], model="text-embedding-3-small")

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
        together = np.concatenate([out[i] for i in range(4)])
        assert together.shape == (40, 384) and together.dtype == np.float32
        # 40 inputs in packs of at most 16 -> 3 calls
        assert sim.stats()["requests"] == 3
        alone = await e.embed([texts[7]], model="text-embedding-3-small")  # from the cache, same vector
        assert np.allclose(alone[0], together[7])
    assert sim.stats()["requests"] == 3
    async with Engine(cfg(sim, tmp_path, cache_path=None)) as e:  # no cache: computed alone, same answer
        single = await e.embed([texts[7]], model="text-embedding-3-small")
        assert np.allclose(single[0], together[7], atol=1e-6)


async def test_no_429_under_a_limit_the_engine_knows(tmp_path):
    async with Simulator(SimConfig(rps=20, batch_delay_s=None)) as sim:
        reqs = [BatchRequest(custom_id=f"r{i}", body=chat(f"q {i}")) for i in range(50)]
        async with Engine(cfg(sim, tmp_path, limits=Limits(rps=20), concurrency=64)) as e:
            got = [r async for r in e.generate(reqs)]
        assert len(got) == 50 and all(r.error is None for r in got)
        st = sim.stats()
        assert st["by_status"] == {"200": 50}


@pytest.mark.parametrize("headers", ["openai", "none"])
async def test_429_cools_down_then_succeeds(tmp_path, headers):
    # The engine does not know the limit. With OpenAI headers it honours retry-after-ms (a shared cooldown); with
    # none it backs off with jitter. Either way every request ends answered.
    async with Simulator(SimConfig(rps=10, headers=headers, batch_delay_s=None)) as sim:
        reqs = [BatchRequest(custom_id=f"r{i}", body=chat(f"q {i}")) for i in range(25)]
        conf = cfg(sim, tmp_path, concurrency=25, max_attempts=30, learn_limits_from_headers=False,
                   backoff_base=0.2, backoff_cap=1.0)
        async with Engine(conf) as e:
            got = [r async for r in e.generate(reqs)]
            assert e.stats.rate_limited > 0 and e.stats.retries == e.stats.rate_limited
        assert sorted(r.custom_id for r in got) == sorted(f"r{i}" for i in range(25))
        assert all(r.error is None for r in got)
        assert sim.stats()["by_status"]["429"] == e.stats.rate_limited < 100


async def test_header_sync_learns_the_limit(tmp_path):
    async with Simulator(SimConfig(rpm=30, batch_delay_s=None)) as sim:
        async with Engine(cfg(sim, tmp_path, concurrency=1)) as e:
            for i in range(3):
                await e.chat(chat(f"q {i}"))
            b = e.budget(MODEL)
            assert [w.limit for w in b.requests] == [30]
            assert b.requests[0].used >= 3


@pytest.mark.parametrize("fault", ["rate_500", "rate_503", "rate_reset", "rate_truncated", "rate_non_json"])
async def test_transient_faults_are_retried(tmp_path, fault):
    async with Simulator(SimConfig(batch_delay_s=None, seed=3, **{fault: 0.4})) as sim:
        reqs = [BatchRequest(custom_id=f"r{i}", body=chat(f"q {i}")) for i in range(30)]
        async with Engine(cfg(sim, tmp_path, max_attempts=30)) as e:
            got = [r async for r in e.generate(reqs)]
            assert e.stats.retries > 0
        assert all(r.error is None for r in got), [r.error for r in got if r.error]
        assert sum(sim.stats()["faults"].values()) == e.stats.retries


async def test_hang_times_out_and_is_retried(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None, rate_hang=0.5, hang_s=5, seed=1)) as sim:
        async with Engine(cfg(sim, tmp_path, timeout=0.3, max_attempts=20)) as e:
            reqs = [BatchRequest(custom_id=f"r{i}", body=chat(f"q {i}")) for i in range(6)]
            got = [r async for r in e.generate(reqs)]
        assert all(r.error is None for r in got)
        assert e.stats.retries >= 1


async def test_attempts_run_out_into_a_recorded_failure(tmp_path):
    """A request failing alone (the provider answers others) spends its attempts and is that request's error."""
    from oddserver import OddServer

    with OddServer() as srv:
        async with Engine(cfg(srv, tmp_path, max_attempts=3)) as e:
            await e.chat(chat("hello"))
            with pytest.raises(RequestFailed) as info:
                await e.chat(chat("500"))
            await e.chat(chat("the run goes on"))
        assert info.value.error.code == "server_error" and info.value.error.attempts == 3
        assert srv.requests == 1 + 3 + 1


async def test_attempts_run_out_on_a_provider_that_never_answered_is_a_stop(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None, rate_500=1.0)) as sim:
        async with Engine(cfg(sim, tmp_path, max_attempts=3)) as e:
            with pytest.raises(RunStopped, match="answered only errors"):
                await e.chat(chat("doomed"))
            with pytest.raises(RunStopped):  # stays stopped: nothing more is sent
                await e.chat(chat("next"))
        assert sim.stats()["requests"] == 3


async def test_400_is_a_failure_without_retry_and_the_run_goes_on(sim, tmp_path):
    reqs = [BatchRequest(custom_id="bad", body={"model": MODEL, "messages": []}),
            BatchRequest(custom_id="good", body=chat("fine"))]
    async with Engine(cfg(sim, tmp_path)) as e:
        got = {r.custom_id: r async for r in e.generate(reqs)}
    assert got["bad"].error.code == "bad_request" and got["bad"].error.attempts == 1
    assert got["good"].error is None
    assert sim.stats()["requests"] == 2


async def test_request_too_large_is_a_failure(tmp_path):
    async with Simulator(SimConfig(tpm=50, batch_delay_s=None)) as sim:
        async with Engine(cfg(sim, tmp_path, learn_limits_from_headers=False)) as e:
            with pytest.raises(RequestFailed) as info:
                await e.chat(chat("x " * 100, max_tokens=10))
        assert info.value.error.code == "request_too_large"
        async with Engine(cfg(sim, tmp_path, limits=Limits(tpm=50))) as e:  # known limit: refused before sending
            with pytest.raises(RequestFailed) as info:
                await e.chat(chat("x " * 100, max_tokens=10))
        assert info.value.error.code == "exceeds_budget"
        assert sim.stats()["requests"] == 1


@pytest.mark.parametrize("conf,code", [({"quota_after": 3}, "quota"), ({"api_key": "sk-right"}, "API key")])
async def test_quota_and_auth_stop_the_run(tmp_path, monkeypatch, conf, code):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret-123")
    async with Simulator(SimConfig(batch_delay_s=None, **conf)) as sim:
        reqs = [BatchRequest(custom_id=f"r{i}", body=chat(f"q {i}")) for i in range(20)]
        got = []
        async with Engine(cfg(sim, tmp_path, concurrency=1)) as e:
            with pytest.raises(RunStopped) as info:
                async for r in e.generate(reqs):
                    got.append(r)
            assert code in info.value.message
            assert "sk-wrong-secret-123" not in info.value.message
            with pytest.raises(RunStopped):
                await e.chat(chat("after the stop"))
        assert len(got) == (3 if "quota_after" in conf else 0)
        assert all(r.error is None for r in got)


async def test_generate_replays_cache_and_reports_duplicates(sim, tmp_path):
    reqs = [BatchRequest(custom_id=f"r{i}", body=chat(f"q {i}")) for i in range(20)]
    reqs.append(BatchRequest(custom_id="r3", body=chat("again")))
    reqs.append(BatchRequest(custom_id="u", url="/v1/images", body={}))
    async with Engine(cfg(sim, tmp_path)) as e:
        first = {r.custom_id: r async for r in e.generate(reqs[:10])}
    async with Engine(cfg(sim, tmp_path)) as e:
        results = [r async for r in e.generate(iter(reqs))]
        assert e.stats.cached == 10 and e.stats.sent == 10
    ids = [r.custom_id for r in results]
    assert len(ids) == 22 and set(ids) == {f"r{i}" for i in range(20)} | {"u"}
    errors = [r.error for r in results if r.error is not None]
    assert sorted(e.code for e in errors) == ["bad_input", "duplicate_custom_id"]
    by_id = {r.custom_id: r for r in results if r.error is None}
    assert by_id["r0"].response.body == first["r0"].response.body
    assert sim.stats()["requests"] == 20


async def test_generate_embeddings_lines_are_packed_and_unpacked(sim, tmp_path):
    reqs = [BatchRequest(custom_id=f"e{i}", url="/v1/embeddings",
                         body={"model": "text-embedding-3-small", "input": [f"a {i}", f"b {i}"] if i % 2 else f"c {i}"})
            for i in range(30)]
    async with Engine(cfg(sim, tmp_path, concurrency=64)) as e:
        got = {r.custom_id: r async for r in e.generate(reqs)}
    assert sim.stats()["requests"] < 5
    assert len(got["e1"].response.body["data"]) == 2 and len(got["e2"].response.body["data"]) == 1
    assert [d["index"] for d in got["e1"].response.body["data"]] == [0, 1]
    assert sum(r.response.body["usage"]["prompt_tokens"] for r in got.values()) == sim.stats()["tokens"]["prompt"]


async def test_api_key_is_never_stored(tmp_path, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    async with Simulator(SimConfig(api_key=secret, batch_delay_s=None)) as sim:
        async with Engine(cfg(sim, tmp_path)) as e:
            await e.chat(chat("keep it secret"))
            await e.embed(["also secret"], model="text-embedding-3-small")
    for f in tmp_path.iterdir():
        assert secret.encode() not in f.read_bytes(), f


async def test_generate_sends_an_async_sources_requests_as_they_come(sim, tmp_path):
    # Each request is made only after the previous one's result is back: a source that needs its results to go
    # on. Gathering 256 requests before sending any would wait forever here.
    import anyio

    got = []
    next_one = anyio.Event()

    async def source():
        for i in range(5):
            yield BatchRequest(custom_id=f"r{i}", body=chat(f"step {i}"))
            await next_one.wait()

    async with Engine(cfg(sim, tmp_path)) as e:
        with anyio.fail_after(10):
            async for r in e.generate(source()):
                got.append(r.custom_id)
                next_one.set()
                next_one = anyio.Event()
    assert got == [f"r{i}" for i in range(5)]
    assert sim.stats()["requests"] == 5


async def test_generate_closed_early_stops_reading_a_waiting_async_source(sim, tmp_path):
    import contextlib

    import anyio

    finished = []

    async def source():
        try:
            yield BatchRequest(custom_id="r0", body=chat("only"))
            await anyio.sleep_forever()  # a producer with nothing more to say, yet
        finally:
            finished.append(True)

    async with Engine(cfg(sim, tmp_path)) as e:
        with anyio.fail_after(10):
            async with contextlib.aclosing(e.generate(source())) as results:
                async for r in results:
                    assert r.custom_id == "r0"
                    break
    assert finished == [True]  # the producer was stopped, not left waiting


class ProducerBroke(Exception):
    pass


@pytest.mark.parametrize("kind", ["async", "async_after_wire", "sync"])
async def test_a_producers_exception_comes_out_as_itself_after_what_it_made_before(tmp_path, kind):
    # What the producer made before it broke is sent (two connections for ten requests: most of them wait in
    # the run's queue, or in the source's buffer, when it breaks), their results come out and are cached, so a
    # rerun sends nothing for them. Then the producer's own exception is raised.
    import anyio

    def request(i):
        return BatchRequest(custom_id=f"r{i}", body=chat(f"made {i}"))

    async def async_source():
        for i in range(10):
            yield request(i)
        if kind == "async_after_wire":
            await sim.wait_requests(2)  # two are on the wire, eight wait
        raise ProducerBroke("the producer broke")

    def sync_source():
        for i in range(10):
            yield request(i)
        raise ProducerBroke("the producer broke")

    async with Simulator(SimConfig(latency_ms=50, batch_delay_s=None)) as sim:
        got = []
        async with Engine(cfg(sim, tmp_path, concurrency=2)) as e:
            with anyio.fail_after(20), pytest.raises(ProducerBroke, match="the producer broke"):
                async for r in e.generate(sync_source() if kind == "sync" else async_source()):
                    got.append(r.custom_id)
        assert sorted(got) == sorted(f"r{i}" for i in range(10))
        async with Engine(cfg(sim, tmp_path)) as e:
            again = [r async for r in e.generate([request(i) for i in range(10)])]
            assert e.stats.sent == 0 and len(again) == 10
        assert sim.stats()["requests"] == 10


async def test_a_fast_async_source_is_read_in_whole_chunks(sim, tmp_path):
    # Items that are ready at once fill chunks of 256: one cache query and one duplicate check per chunk, as for
    # a list (a pause per item gave chunks of about 2 and halved the speed of a fast async source).
    import anyio

    from tcia_async.engine.runner import CHUNK, QueueSink, Source

    async def source():
        for i in range(600):
            yield BatchRequest(custom_id=f"r{i}", body=chat(f"fast {i}"))

    async with Engine(cfg(sim, tmp_path)) as e:
        src = Source(e.requests, source(), QueueSink(limit=10_000))
        sizes = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(src.pump)
            while (chunk := await src.next_chunk()) is not None:
                sizes.append(len(chunk))
        src.close()
    assert sum(sizes) == 600 and max(sizes) == CHUNK and len(sizes) <= 4, sizes
    assert sim.stats()["requests"] == 0


async def test_a_batch_request_subclass_is_a_request(sim, tmp_path):
    class MyRequest(BatchRequest):
        pass

    async with Engine(cfg(sim, tmp_path)) as e:
        got = [r async for r in e.generate([MyRequest(custom_id="mine", body=chat("a subclass"))])]
    assert got[0].error is None and got[0].response.status_code == 200
