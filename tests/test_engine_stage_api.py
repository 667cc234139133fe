"""The engine as a pipeline stage uses it: models never block each other, later stages go first, cancellation
never pays twice, errors come out as themselves, and every call is counted under its stage."""

from __future__ import annotations

import sqlite3

import anyio
import numpy as np
import orjson
import pytest

from tcia_async.config import ConfigError, EngineConfig, Limits, Price
from tcia_async.engine import Engine, NotSent, RequestFailed, RunStopped, StageEngine
from tcia_async.records import BatchRequest
from tcia_async.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio

EMB = "text-embedding-3-small"


def chat(text: str, model: str = "gpt-4o-mini", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


async def test_an_exception_in_the_block_comes_out_as_itself(sim, tmp_path):
    with pytest.raises(ValueError, match="mine"):
        async with Engine(EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))):
            raise ValueError("mine")
    # ... and the cache was closed properly: it opens again at once.
    async with Engine(EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))):
        pass


async def test_a_model_under_a_tight_limit_never_blocks_another(tmp_path):
    """Ten calls queued for a model limited to 2 a second, four connection slots: a call to another model is
    answered before the limited ones, instead of waiting seconds for a slot."""
    async with Simulator(SimConfig(latency_ms=5, batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, concurrency=4, model_limits={"slow-model": Limits(rps=2)})
        done: list[str] = []
        async with Engine(cfg) as engine:

            async def limited(i: int) -> None:
                await engine.chat(chat(f"q{i}", model="slow-model"))
                done.append("slow")

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(limited, i)
                await sim.wait_requests(2)  # the first second's two are out; eight wait for budget
                await engine.chat(chat("other", model="fast-model"))
                done.append("fast")
                assert done.count("slow") <= 4  # the limited ones are still waiting: nobody held the slots
        assert done.count("slow") == 10


async def test_a_later_stage_goes_first_when_slots_are_short(tmp_path):
    # The latency outlasts the waits below (wait_all_tasks_blocked sleeps 0.1 s when it finds a task not started).
    async with Simulator(SimConfig(latency_ms=500, batch_delay_s=None)) as sim:
        order: list[str] = []
        async with Engine(EngineConfig(base_url=sim.base_url, concurrency=1)) as engine:

            async def one(name: str, priority: int) -> None:
                await engine.chat(chat(name), priority=priority)
                order.append(name)

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "first", 0)
                await sim.wait_requests(1)  # on the wire, holding the only slot
                for i in range(3):
                    tg.start_soon(one, f"early-{i}", 0)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(one, "judge", 6)
                await anyio.wait_all_tasks_blocked()
                assert order == [] and len(engine.requests.slots._waiters) == 4  # all queued behind "first"
        assert order == ["first", "judge", "early-0", "early-1", "early-2"]


async def test_a_cancelled_caller_never_makes_a_second_paid_call(tmp_path):
    async with Simulator(SimConfig(latency_ms=100, batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))
        async with Engine(cfg) as engine:
            got: list[dict] = []

            async def second_caller() -> None:
                got.append(await engine.chat(chat("shared")))

            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as first:
                    tg.start_soon(second_caller)
                    await sim.wait_requests(1)
                    first.cancel()
                    await engine.chat(chat("shared"))  # cancelled while its request is on the wire
            assert got and got[0]["choices"]
            # The answer the cancelled caller had paid for is in the cache too.
            again = await engine.chat(chat("shared"))
            assert again == got[0]
        assert sim.stats()["requests"] == 1


@pytest.mark.parametrize("kind", ["chat", "embed"])
async def test_an_answer_on_its_way_is_cached_when_its_only_caller_is_gone(tmp_path, kind):
    """The caller leaves while its request (or packed embeddings call) is on the wire, and the engine closes right
    after: the answer is still cached, so the next run sends nothing."""

    async def ask(engine: Engine) -> None:
        if kind == "chat":
            await engine.chat(chat("alone"))
        else:
            await engine.embed(["alone"], model=EMB)

    async with Simulator(SimConfig(latency_ms=300, batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))
        async with Engine(cfg) as engine:
            with anyio.move_on_after(0.03):
                await ask(engine)
            assert engine.stats.cached == 0
        async with Engine(cfg) as engine:
            await ask(engine)
            assert engine.stats.sent == 0 and engine.stats.cached == 1
        assert sim.stats()["requests"] == 1


async def test_a_deadline_around_chat_fires_on_time_and_the_answer_is_kept(tmp_path):
    async with Simulator(SimConfig(latency_ms=1000, batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))
        async with Engine(cfg) as engine:
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.05):
                    await engine.chat(chat("late"))
            assert engine.stats.in_flight == 1  # control came back while the request was on the wire
        async with Engine(cfg) as engine:
            await engine.chat(chat("late"))
            assert engine.stats.sent == 0
        assert sim.stats()["requests"] == 1


async def test_a_caller_gone_before_the_wire_sends_nothing(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, model_limits={"m": Limits(rps=1)})
        async with Engine(cfg) as engine:
            await engine.chat(chat("fills the window", model="m"))
            with anyio.move_on_after(0.05) as scope:
                await engine.chat(chat("no longer wanted", model="m"))  # waits about a second for budget
            assert scope.cancelled_caught
        assert sim.stats()["requests"] == 1


async def test_a_cancelled_embed_keeps_its_packed_answers_and_never_reads_as_a_stop(tmp_path):
    async with Simulator(SimConfig(latency_ms=100, batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))
        texts = [f"text {i}" for i in range(5)]
        async with Engine(cfg) as engine:
            with anyio.move_on_after(0.03) as scope:
                await engine.embed(texts, model=EMB)
            assert scope.cancelled_caught
            # A second caller for the same texts waits for the packed call already going: nothing is sent again.
            vectors = await engine.embed(texts, model=EMB)
            assert vectors.shape == (5, 384)
        assert sim.stats()["requests"] == 1
        async with Engine(cfg) as engine:
            await engine.embed(texts, model=EMB)
            assert engine.stats.sent == 0


async def test_a_cancelled_waiter_before_the_wire_lets_the_next_caller_send(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, model_limits={"m": Limits(rps=1)})
        async with Engine(cfg) as engine:
            await engine.chat(chat("fills the window", model="m"))
            results: list[dict] = []

            async def second() -> None:
                results.append(await engine.chat(chat("queued", model="m")))

            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as scope:
                    tg.start_soon(second)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
                    await engine.chat(chat("queued", model="m"))  # waiting for budget when cancelled
            assert results and results[0]["choices"]
        assert sim.stats()["requests"] == 2  # the queued request went out once, sent by the second caller


async def test_halt_is_not_a_stop(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url)) as engine:
            engine.halt()
            with pytest.raises(NotSent):
                await engine.embed(["x"], model=EMB)
            with pytest.raises(NotSent):
                await engine.chat(chat("x"))
            assert engine.stopped is None


async def test_every_call_is_counted_under_its_stage_and_model(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        prices = {"gpt-4o-mini": Price(input=1.0, output=2.0)}
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"), prices=prices)
        async with Engine(cfg) as engine:
            await engine.chat(chat("a"), stage="compose")
            await engine.chat(chat("a"), stage="compose")  # from the cache
            await engine.chat(chat("b", model="gpt-4.1"), stage="judge")
            await engine.embed(["t1", "t2"], model=EMB, stage="retrieve")
            with pytest.raises(RequestFailed):
                await engine.chat({"model": "gpt-4o-mini", "messages": []}, stage="judge")  # a 400
        s = engine.stats
        assert (s.stages["compose"].ok, s.stages["compose"].cached, s.stages["compose"].sent) == (2, 1, 1)
        assert (s.stages["judge"].ok, s.stages["judge"].failed) == (1, 1)
        assert s.stages["retrieve"].ok == 2
        assert s.models["gpt-4.1"].ok == 1 and s.models["gpt-4o-mini"].cost > 0
        assert s.cost == pytest.approx(s.models["gpt-4o-mini"].cost)  # only priced models cost
        assert s.ok == 5 and s.failed == 1


async def test_a_recording_fake_satisfies_what_a_stage_needs():
    class Fake:
        def __init__(self) -> None:
            self.calls: list[str] = []

        async def chat_json(self, body, typ, *, schema_name=None, sample=0, stage="", priority=0):
            self.calls.append(stage)
            return typ()

        async def embed(self, texts, model, *, dimensions=None, stage="", priority=0):
            return np.zeros((len(texts), 4), dtype=np.float32)

    async def a_stage(engine: StageEngine) -> int:
        vecs = await engine.embed(["a", "b"], model="m", stage="s")
        return len(vecs)

    assert await a_stage(Fake()) == 2


async def test_a_stopped_run_stays_stopped(tmp_path):
    async with Simulator(SimConfig(quota_after=0, batch_delay_s=None)) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url)) as engine:
            with pytest.raises(RunStopped, match="quota"):
                await engine.chat(chat("x"))
            with pytest.raises(RunStopped):
                await engine.chat(chat("y"))
            assert "quota" in (engine.stopped or "")
        assert sim.stats()["requests"] == 1


async def test_prompt_cached_tokens_are_counted_and_priced(tmp_path):
    """A long static prefix repeated: the provider (the simulator's emulation) serves it from its prompt cache;
    the engine counts those tokens and prices them at `cached_input`."""
    system = "You grade answers. " + " ".join(f"Rule {i}: be precise about point {i}." for i in range(200))
    prices = {"gpt-4o-mini": Price(input=1.0, output=2.0, cached_input=0.25)}
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url, prices=prices)) as engine:
            for i in range(3):
                body = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [
                    {"role": "system", "content": system}, {"role": "user", "content": f"answer {i}"}]}
                await engine.chat(body, stage="judge")
        s = engine.stats.stages["judge"]
    assert s.cached_tokens >= 2 * 1024 and s.cached_tokens % 128 == 0
    assert s.cost < s.cost_full
    saved = s.cached_tokens * (1.0 - 0.25) / 1e6
    assert s.cost_full - s.cost == pytest.approx(saved)


async def test_replayed_answers_count_what_they_cost_when_paid_batch_ones_at_the_configured_discount(tmp_path):
    """A rerun replays from the cache: an answer paid online counts at the online price, one the Batch API gave
    (its request id marked so) at the batch discount configured for this run, not a built-in one."""
    from tcia_async.engine.request import BATCH_ID

    prices = {"gpt-4o-mini": Price(input=1.0, output=2.0)}
    cache = tmp_path / "c.db"
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, prices=prices, cache_path=str(cache))
        async with Engine(cfg) as engine:
            online = await engine.chat(chat("online"), stage="s")
            by_batch = await engine.chat(chat("by batch"), stage="s")
        # Mark the second answer as the Batch API's, as batch.py stores its answers.
        with sqlite3.connect(cache) as db:
            db.execute("UPDATE answers SET request_id = ? WHERE body = ?",
                       (BATCH_ID + "x", orjson.dumps(by_batch)))
        async with Engine(cfg, batch_discount=0.25) as engine:
            assert await engine.chat(chat("online"), stage="s") == online
            assert await engine.chat(chat("by batch"), stage="s") == by_batch
        s = engine.stats.stages["s"]
        assert sim.stats()["requests"] == 2  # both replayed

    def cost(answer: dict) -> float:
        return (answer["usage"]["prompt_tokens"] * 1.0 + answer["usage"]["completion_tokens"] * 2.0) / 1e6

    assert s.cost == 0.0 and s.batch_replayed == 1
    assert s.cost_replayed == pytest.approx(cost(online) + 0.25 * cost(by_batch))


async def test_identical_embedding_lines_of_generate_pay_once(tmp_path):
    """Two generate lines with one embeddings body: the second shares the first while it is in flight, and
    reads the cache once it is answered; it is never sent again."""
    async with Simulator(SimConfig(latency_ms=20, batch_delay_s=None)) as sim:
        body = {"model": EMB, "input": "same text"}
        async with Engine(EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"))) as engine:
            key = engine.key(body, "/v1/embeddings")
            first = engine.embedding_entry(body, key)
            second = engine.embedding_entry(body, key)
            assert second is first  # in flight: shared
            answered = await first
            third = await engine.embedding_entry(body, key)  # answered since: from the cache
            assert third.data == answered.data
        assert sim.stats()["requests"] == 1



async def test_a_placeholder_key_does_not_garble_messages(tmp_path, monkeypatch):
    """Keys are scrubbed from what the provider says, but not a placeholder of a few characters (a local server's):
    scrubbing "x" printed "You e***ceeded your current quota". (A real key's scrubbing: test_generate_cli.)"""
    monkeypatch.setenv("TEST_KEY", "x")
    async with Simulator(SimConfig(quota_after=0, batch_delay_s=None)) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url, api_key_env="TEST_KEY")) as engine:
            with pytest.raises(RunStopped):
                await engine.chat(chat("q"))
    assert "You exceeded your current quota" in (engine.stopped or ""), engine.stopped


async def test_misuse_gets_a_clear_error_before_anything_is_sent(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="concurrency"):
        Engine(EngineConfig(base_url="http://127.0.0.1:9/v1", concurrency=0))
    with pytest.raises(ConfigError, match="http://"):
        Engine(EngineConfig(base_url="127.0.0.1:9/v1"))
    engine = Engine(EngineConfig(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(RuntimeError, match="async with"):
        await engine.chat(chat("too early"))
    async with Simulator(SimConfig(batch_delay_s=None, api_key="sk-right-key")) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url)) as engine:
            with pytest.raises(TypeError, match="list of strings"):
                await engine.embed("hello", model=EMB)
            with pytest.raises(TypeError, match="item 1 is int"):
                await engine.embed(["a", 1], model=EMB)  # type: ignore[list-item]
            with pytest.raises(TypeError, match="msgspec Struct"):
                await engine.chat_json(chat("x"), int)
        with pytest.raises(RuntimeError, match="async with"):
            await engine.chat(chat("too late"))
        assert sim.stats()["requests"] == 0
        monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
        async with Engine(EngineConfig(base_url=sim.base_url, api_key_env="NO_SUCH_KEY_VAR")) as engine:
            with pytest.raises(RunStopped, match=r"none was sent \(\$NO_SUCH_KEY_VAR is not set\)"):
                await engine.chat(chat("who am I"))
    assert str(NotSent())  # says what happened


async def test_a_cached_generate_counts_what_its_answers_cost(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        cfg = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "c.db"),
                           prices={"gpt-4o-mini": Price(input=1.0, output=2.0)})
        lines = [BatchRequest(custom_id=f"r{i}", body=chat(f"line {i}")) for i in range(3)]
        async with Engine(cfg) as engine:
            [r async for r in engine.generate(lines)]
            paid = engine.stats.stages["generate"].cost
        async with Engine(cfg) as engine:
            [r async for r in engine.generate(lines)]
            again = engine.stats.stages["generate"]
    assert paid > 0 and again.cost == 0 and again.sent == 0
    assert again.cost_replayed == pytest.approx(paid)


async def test_a_caller_gone_before_its_request_started_sends_nothing_and_the_next_one_sends_it(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url)) as engine:
            with anyio.CancelScope() as scope:
                scope.cancel()  # cancelled at its first wait: before the engine's task ran
                await engine.chat(chat("gone"))
            assert sim.stats()["requests"] == 0
            answer = await engine.chat(chat("gone"))  # a new caller is not handed the first one's NotSent
            assert answer["choices"]
        assert sim.stats()["requests"] == 1
