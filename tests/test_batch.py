"""The Batch API mode (engine/batch.py) against the simulator, in process: answers land in the cache the online
path reads, files are split at each limit, only failed lines go again, state survives an interruption, and the
provider's refusals (expiry, enqueued-token limit, quota) are handled."""

from __future__ import annotations

import anyio
import orjson
import pytest

from tcia_async.config import BatchSettings, ConfigError, EngineConfig, Price, load_batch_settings
from tcia_async.engine import Engine, RunStopped
from tcia_async.engine.batch import (FAILURES_FILE, STATE_FILE, BatchAPI, BatchItem, BatchRun, read_state,
                                     run_batches)
from tcia_async.records import Decomposition
from tcia_async.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio

FAST = dict(poll_interval=0.01, poll_max=0.05)


def body(i: int, model: str = "gpt-4o-mini", **extra) -> dict:
    return {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"question number {i}"}],
            **extra}


def items(engine: Engine, bodies: list[dict]) -> list[BatchItem]:
    return [BatchItem(engine.key(b), "/v1/chat/completions", b) for b in bodies]


def engine_for(sim: Simulator, tmp_path, **kw) -> Engine:
    return Engine(EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "cache.db"), **kw))


def uploaded(sim: Simulator) -> list[list[dict]]:
    """The lines of every batch input file the simulator received, in upload order."""
    store = sim.handlers.batches
    return [[orjson.loads(x) for x in store._content[f["id"]].splitlines()]
            for f in store.files.values() if f["purpose"] == "batch"]


async def test_lifecycle_answers_land_where_the_online_path_looks(tmp_path):
    seen: list[str] = []
    prices = {"gpt-4o-mini": Price(input=1.0, output=2.0)}
    async with Simulator(SimConfig(batch_delay_s=0.02)) as sim, engine_for(sim, tmp_path, prices=prices) as engine:
        bodies = [body(i) for i in range(12)]
        out = await run_batches(engine, items(engine, bodies), tmp_path / "state", BatchSettings(**FAST),
                                stage="respond", on_progress=lambda p: seen.append(p.status))
        assert (out.items, out.uploads, out.batches, out.sent, out.answered, out.failures) == (12, 1, 1, 12, 12, {})
        assert {"validating", "in_progress", "completed"} <= set(seen)
        # The online path finds every answer in the cache: nothing is sent.
        answers = [await engine.chat(b, stage="respond") for b in bodies]
        assert engine.stats.sent == 0 and sim.stats()["ok"] == 0
        assert all(a["choices"][0]["message"]["content"].startswith("[simulated]") for a in answers)
        st = engine.stats.stages["respond"]
        assert st.batch_sent == 12 and st.batch_ok == 12 and st.batch_tokens == st.tokens > 0
        full = (st.prompt_tokens * 1.0 + st.completion_tokens * 2.0) / 1e6
        assert st.batch_cost == pytest.approx(full / 2) and st.batch_saved == pytest.approx(full / 2)
        assert st.cost == pytest.approx(full / 2)
        assert sim.stats()["batch"] == {"lines_ok": 12, "lines_failed": 0}
    (rec,) = read_state(tmp_path / "state")
    assert rec.settled and rec.status == "completed" and rec.batch_id and rec.lines == 12
    # The provider's files were deleted once the batch was settled.
    assert not any(f["purpose"] == "batch" for f in sim.handlers.batches.files.values())


async def test_a_rerun_of_a_settled_set_sends_nothing(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim:
        for _ in range(2):
            async with engine_for(sim, tmp_path) as engine:
                out = await run_batches(engine, items(engine, [body(i) for i in range(5)]), tmp_path / "state",
                                        BatchSettings(**FAST))
        assert (out.items, out.cached, out.uploads) == (5, 5, 0)
        assert sim.stats()["batch"]["lines_ok"] == 5 and len(sim.handlers.batches.batches) == 1


async def test_files_split_at_the_request_count_and_by_model(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim, engine_for(sim, tmp_path) as engine:
        bodies = [body(i) for i in range(10)] + [body(i, model="gpt-4.1-nano") for i in range(3)]
        out = await run_batches(engine, items(engine, bodies), tmp_path / "state",
                                BatchSettings(max_requests=4, delete_files=False, **FAST))
        assert out.answered == 13 and out.uploads == 4
    files = uploaded(sim)
    assert sorted(len(f) for f in files) == [2, 3, 4, 4]
    for f in files:
        assert len({x["body"]["model"] for x in f}) == 1  # one model a file, as providers require


async def test_files_split_at_the_byte_limit(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim, engine_for(sim, tmp_path) as engine:
        out = await run_batches(engine, items(engine, [body(i) for i in range(10)]), tmp_path / "state",
                                BatchSettings(max_bytes=1024, delete_files=False, **FAST))
        assert out.answered == 10 and out.uploads > 1
    store = sim.handlers.batches
    sizes = [len(store._content[f["id"]]) for f in store.files.values() if f["purpose"] == "batch"]
    assert all(s <= 1024 for s in sizes) and sum(len(f) for f in uploaded(sim)) == 10


async def test_files_split_at_the_enqueued_token_budget_and_wait_for_room(tmp_path):
    """Each file holds at most the model's budget, and ours in progress never exceed it together: the simulator,
    enforcing the same limit, refuses none."""
    budget = 60
    async with Simulator(SimConfig(batch_delay_s=0.01, batch_enqueued_tokens=budget)) as sim, \
            engine_for(sim, tmp_path) as engine:
        out = await run_batches(engine, items(engine, [body(i) for i in range(12)]), tmp_path / "state",
                                BatchSettings(model_enqueued_tokens={"gpt-4o-mini": budget}, delete_files=False,
                                              **FAST))
        assert out.answered == 12 and out.uploads > 2
    records = read_state(tmp_path / "state")
    assert all(0 < r.tokens <= budget for r in records) and all(r.status == "completed" for r in records)
    assert not any(b["status"] == "failed" for b in sim.handlers.batches.batches.values())


@pytest.mark.parametrize("at", ["validate", "create"])
async def test_a_batch_refused_for_enqueued_tokens_waits_and_is_created_again(tmp_path, at):
    """The provider's limit is lower than we were told: it refuses (a failed batch, or an error to the create);
    the file waits for one of ours to finish and goes again."""
    async with Simulator(SimConfig(batch_delay_s=0.02, batch_enqueued_tokens=60, batch_token_limit_at=at)) as sim, \
            engine_for(sim, tmp_path) as engine:
        out = await run_batches(engine, items(engine, [body(i) for i in range(12)]), tmp_path / "state",
                                BatchSettings(max_requests=4, **FAST))
        assert out.answered == 12 and out.failures == {} and out.resubmitted == 0
        assert sim.stats()["batch"]["lines_ok"] == 12 and sim.stats()["duplicates"] == 0
    events = [orjson.loads(x) for x in (tmp_path / "state" / STATE_FILE).read_bytes().splitlines()]
    if at == "validate":
        assert any(e["event"] == "refused" for e in events)


async def test_only_failed_lines_are_resubmitted_and_permanent_failures_are_kept(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01, batch_fail_rate=0.3, seed=3)) as sim, \
            engine_for(sim, tmp_path) as engine:
        bodies = [body(i) for i in range(40)] + [body(99, max_tokens=0)]  # the last one is a 400
        settings = BatchSettings(max_resubmits=10, delete_files=False, **FAST)
        out = await run_batches(engine, items(engine, bodies), tmp_path / "state", settings)
        bad = engine.key(bodies[-1])
        assert set(out.failures) == {bad} and out.failures[bad].status == 400
        assert out.answered == 40 and out.resubmitted > 0
        # Each file after the first holds exactly the lines that failed transiently in the one before.
        files = uploaded(sim)
        store = sim.handlers.batches
        by_input = {b["input_file_id"]: b for b in store.batches.values()}
        batch_files = [f for f in store.files.values() if f["purpose"] == "batch"]
        for prev, nxt in zip(batch_files, batch_files[1:]):
            err = by_input[prev["id"]]["error_file_id"]
            failed = {orjson.loads(x)["custom_id"] for x in store._content[err].splitlines()
                      if orjson.loads(x)["response"]["status_code"] == 500}
            assert {x["custom_id"] for x in files[batch_files.index(nxt)]} == failed
        stats = sim.stats()
        assert stats["batch"]["lines_ok"] == 40 and stats["duplicates"] == 0  # every line answered once
        # The 400 line went again only while it failed with a 500 (the simulator draws those first).
        with_bad = [i for i, f in enumerate(files) if bad.hex() in {x["custom_id"] for x in f}]
        assert with_bad == list(range(len(with_bad)))
        last = by_input[batch_files[with_bad[-1]]["id"]]
        assert any(orjson.loads(x)["response"]["status_code"] == 400 for x in
                   store._content[last["error_file_id"]].splitlines())
        # A rerun knows the permanent failure from the state directory and sends nothing.
        n = len(store.batches)
        again = await run_batches(engine, items(engine, bodies), tmp_path / "state", settings)
        assert set(again.failures) == {bad} and again.uploads == 0 and len(store.batches) == n
    assert orjson.loads((tmp_path / "state" / FAILURES_FILE).read_bytes().splitlines()[0])["key"] == bad.hex()


async def test_lines_still_failing_after_the_cap_are_failures_of_this_run_only(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01, batch_fail_rate=1.0)) as sim, \
            engine_for(sim, tmp_path) as engine:
        its = items(engine, [body(i) for i in range(3)])
        out = await run_batches(engine, its, tmp_path / "state", BatchSettings(max_resubmits=1, **FAST))
        assert set(out.failures) == {it.key for it in its}
        assert {(e.code, e.status, e.attempts) for e in out.failures.values()} == {("server_error", 500, 2)}
        assert len(sim.handlers.batches.batches) == 2  # the first and one resubmission
    assert not (tmp_path / "state" / FAILURES_FILE).exists()  # a rerun tries them again


async def test_an_expired_batch_resubmits_only_its_unanswered_lines(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01, batch_expire=1)) as sim, engine_for(sim, tmp_path) as engine:
        out = await run_batches(engine, items(engine, [body(i) for i in range(10)]), tmp_path / "state",
                                BatchSettings(delete_files=False, **FAST))
        assert out.answered == 10 and out.resubmitted == 5 and out.failures == {}
        statuses = [b["status"] for b in sim.handlers.batches.batches.values()]
        assert statuses == ["expired", "completed"]
        assert [len(f) for f in uploaded(sim)] == [10, 5]
        assert sim.stats()["batch"]["lines_ok"] == 10 and sim.stats()["duplicates"] == 0
    assert [r.round for r in read_state(tmp_path / "state")] == [0, 1]


async def test_a_cancelled_run_reattaches_and_never_uploads_again(tmp_path):
    """Cancelled while its batch is in progress, the call returns at once; the next call follows that batch
    instead of uploading its lines again, and every line is answered once."""
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        async with engine_for(sim, tmp_path) as engine:
            its = items(engine, [body(i) for i in range(6)])
            with anyio.CancelScope() as scope:
                async def cancel_when_created():
                    await sim.handlers.batches.wait_created(1)
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_when_created)
                    await run_batches(engine, its, tmp_path / "state", BatchSettings(**FAST))
            assert scope.cancelled_caught
        (rec,) = read_state(tmp_path / "state")
        assert rec.batch_id and not rec.settled
        sim.advance_batches()
        sim.advance_batches()
        async with engine_for(sim, tmp_path) as engine:
            out = await run_batches(engine, its, tmp_path / "state", BatchSettings(**FAST))
        assert (out.reattached, out.held, out.uploads, out.answered) == (1, 6, 0, 6)
        assert len(sim.handlers.batches.batches) == 1 and sim.stats()["batch"]["lines_ok"] == 6


async def test_a_batch_created_but_not_recorded_is_found_by_its_file(tmp_path):
    """A kill between the create and its record: the rerun finds the batch in the provider's list by its input
    file instead of creating a second one."""
    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim:
        async with engine_for(sim, tmp_path) as engine:
            its = items(engine, [body(i) for i in range(4)])
            run = BatchRun(engine, tmp_path / "state", BatchSettings(**FAST))
            real = run._append

            class Killed(Exception):
                pass

            def crash_on_batch(event, rec, **fields):
                if event == "batch":
                    raise Killed  # stands for the kill: nothing after the create is recorded
                real(event, rec, **fields)

            run._append = crash_on_batch
            with pytest.raises(Killed):
                await run.run(its)
        assert len(sim.handlers.batches.batches) == 1
        (rec,) = read_state(tmp_path / "state")
        assert rec.file_id and rec.batch_id is None
        async with engine_for(sim, tmp_path) as engine:
            out = await run_batches(engine, its, tmp_path / "state", BatchSettings(**FAST))
        assert (out.reattached, out.batches, out.uploads, out.answered) == (1, 0, 0, 4)
        assert len(sim.handlers.batches.batches) == 1 and sim.stats()["batch"]["lines_ok"] == 4


@pytest.mark.parametrize("made", [True, False])
async def test_a_create_that_fails_transiently_never_makes_two_batches(tmp_path, monkeypatch, made):
    """A 500 (or a timeout) to a create may come after the provider made the batch: it is looked for by its file
    before another create is sent."""
    from tcia_async.engine.batch import BatchRefused
    from tcia_async.engine.retry import RETRY, Verdict

    real = BatchAPI.create
    calls = []

    async def flaky(self, body):
        calls.append(body)
        if len(calls) == 1:
            if made:
                await real(self, body)
            raise BatchRefused(Verdict(RETRY, "server_error", "simulated 500", 500), b"")
        return await real(self, body)

    monkeypatch.setattr(BatchAPI, "create", flaky)
    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim, \
            engine_for(sim, tmp_path, backoff_base=0.001) as engine:
        out = await run_batches(engine, items(engine, [body(i) for i in range(3)]), tmp_path / "state",
                                BatchSettings(**FAST))
        assert out.answered == 3 and len(sim.handlers.batches.batches) == 1
        assert len(calls) == (1 if made else 2)


async def test_quota_at_upload_stops_the_run_and_the_online_path(tmp_path):
    async with Simulator(SimConfig(batch_delay_s=0.01, upload_quota_after=0)) as sim, \
            engine_for(sim, tmp_path) as engine:
        with pytest.raises(RunStopped, match="insufficient_quota"):
            await run_batches(engine, items(engine, [body(1)]), tmp_path / "state", BatchSettings(**FAST))
        with pytest.raises(RunStopped):
            await engine.chat(body(2))
        assert sim.stats()["ok"] == 0


async def test_a_wrong_key_stops_the_run_and_the_key_is_not_in_the_message(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-SECRET")
    async with Simulator(SimConfig(batch_delay_s=0.01, api_key="sk-right")) as sim, \
            engine_for(sim, tmp_path) as engine:
        with pytest.raises(RunStopped) as info:
            await run_batches(engine, items(engine, [body(1)]), tmp_path / "state", BatchSettings(**FAST))
        assert "401" in info.value.message and "SECRET" not in info.value.message


async def test_embeddings_and_chat_json_items(tmp_path):
    from tcia_async.engine.batch import chat_json_item

    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim, engine_for(sim, tmp_path) as engine:
        emb = {"model": "text-embedding-3-small", "input": "a text to embed"}
        question = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a summary in 3 bullets."}]}
        its = [BatchItem(engine.key(emb, "/v1/embeddings"), "/v1/embeddings", emb),
               chat_json_item(engine, question, Decomposition, schema_name="decomposition")]
        out = await run_batches(engine, its, tmp_path / "state", BatchSettings(**FAST))
        assert out.answered == 2 and out.uploads == 2  # one endpoint a file
        vec = await engine.embed(["a text to embed"], model="text-embedding-3-small")
        typed = await engine.chat_json(question, Decomposition, schema_name="decomposition")
        assert vec.shape == (1, 384) and isinstance(typed, Decomposition)
        assert engine.stats.sent == 0 and sim.stats()["ok"] == 0


async def test_the_pass_after_the_batches_replays_and_never_sends_a_failed_request(tmp_path):
    """What a pipeline stage in batch mode does: batch its first requests, then run as online through
    BatchReplay: answers from the cache, failures raised as the stage would see them online, nothing sent."""
    from tcia_async.engine import RequestFailed
    from tcia_async.engine.batch import BatchReplay, chat_json_item

    async with Simulator(SimConfig(batch_delay_s=0.01)) as sim, engine_for(sim, tmp_path) as engine:
        ok = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a poem. Use four lines."}]}
        bad = {**ok, "max_tokens": 0}
        its = [chat_json_item(engine, b, Decomposition, schema_name="d") for b in (ok, bad)]
        out = await run_batches(engine, its, tmp_path / "state", BatchSettings(**FAST), stage="decompose")
        stage = BatchReplay(engine, out.failures)
        assert isinstance(await stage.chat_json(ok, Decomposition, schema_name="d", stage="decompose"),
                          Decomposition)
        with pytest.raises(RequestFailed) as info:
            await stage.chat_json(bad, Decomposition, schema_name="d", stage="decompose")
        assert info.value.error.status == 400
        assert engine.stats.sent == 0 and sim.stats()["ok"] == 0
        assert engine.stats.stages["decompose"].failed == 1


async def test_the_api_lists_cancels_and_reports_missing_batches(tmp_path):
    from tcia_async.engine.batch import BatchRefused
    from tcia_async.engine.client import Transport

    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        t = Transport(sim.base_url, None, 4, 10)
        await t.open()
        try:
            api = BatchAPI(t, EngineConfig(max_attempts=2))
            path = tmp_path / "in.jsonl"
            path.write_bytes(orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                           "body": body(1)}) + b"\n")
            f = await api.upload(path)
            b = await api.create({"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                  "completion_window": "24h"})
            assert (await api.find({f["id"]}, 0))[f["id"]]["id"] == b["id"]
            assert (await api.cancel(b["id"]))["status"] == "cancelled"
            with pytest.raises(BatchRefused):
                await api.batch("batch_missing")
        finally:
            await t.close()


def test_batch_settings_are_checked_and_name_their_source(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[batch]\nmax_requests = 10\npoll_interval = 2\n[batch.model_enqueued_tokens]\nm = 100\n")
    s = load_batch_settings(cfg)
    assert (s.max_requests, s.poll_interval, s.token_budget("m"), s.token_budget("other")) == (10, 2.0, 100, None)
    cfg.write_text("[batch]\ndiscount = 1.5\n")
    with pytest.raises(ConfigError, match=r"\[batch\] discount = 1.5"):
        load_batch_settings(cfg)
    cfg.write_text("[batch]\nmax_request = 10\n")
    with pytest.raises(ConfigError, match="max_request"):
        load_batch_settings(cfg)
    with pytest.raises(ConfigError, match="--poll-interval = 0"):
        load_batch_settings(None, {"poll_interval": 0}, {"poll_interval": "--poll-interval"})
