"""Files and the Batch API through the openai SDK: upload, lifecycle, output and error files, cancel, list."""

from __future__ import annotations

import json

import openai
import pytest

from tcia_async.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio


def line(cid: str, content: str, url: str = "/v1/chat/completions", **extra) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def client(sim) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)


async def test_files_upload_get_content_delete(sim):
    data = jsonl([line("a", "x")])
    async with client(sim) as c:
        f = await c.files.create(file=("in.jsonl", data), purpose="batch")
        assert f.purpose == "batch" and f.bytes == len(data) and f.filename == "in.jsonl"
        assert (await c.files.retrieve(f.id)).id == f.id
        assert (await c.files.content(f.id)).content == data
        assert [x.id async for x in c.files.list()] == [f.id]
        assert (await c.files.delete(f.id)).deleted is True
        with pytest.raises(openai.NotFoundError):
            await c.files.retrieve(f.id)


async def test_batch_lifecycle_validating_in_progress_completed(sim):
    lines = [line("req-1", "first"), line("req-2", "second"), line("bad", "x", max_tokens=0),
             line("req-3", "first")]
    async with client(sim) as c:
        f = await c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                   metadata={"run": "t"})
        assert b.status == "validating" and b.input_file_id == f.id and b.metadata == {"run": "t"}
        assert (await c.batches.retrieve(b.id)).status == "validating"
        sim.advance_batches()
        mid = await c.batches.retrieve(b.id)
        assert mid.status == "in_progress" and mid.in_progress_at is not None
        assert mid.request_counts.total == 4 and mid.output_file_id is None
        sim.advance_batches()
        done = await c.batches.retrieve(b.id)
        assert done.status == "completed" and done.completed_at is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
        out = [json.loads(x) for x in (await c.files.content(done.output_file_id)).text.splitlines()]
        err = [json.loads(x) for x in (await c.files.content(done.error_file_id)).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["req-1", "req-2", "req-3"]
    for o in out:
        assert set(o) == {"id", "custom_id", "response", "error"} and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        assert o["response"]["body"]["choices"][0]["message"]["content"].startswith("[simulated]")
    # Same body, same answer, online or in a batch.
    assert out[0]["response"]["body"]["choices"] == out[2]["response"]["body"]["choices"]
    (e,) = err
    assert e["custom_id"] == "bad" and e["response"]["status_code"] == 400
    assert e["response"]["body"]["error"]["param"] == "max_tokens"
    stats = sim.stats()
    assert stats["batch"] == {"lines_ok": 3, "lines_failed": 1}
    assert stats["unique"] == 2 and stats["duplicates"] == 1  # req-3 repeats req-1's body


async def test_batch_completes_on_its_own_after_the_delay(anyio_backend):
    async with Simulator(SimConfig(batch_delay_s=0.2)) as sim, client(sim) as c:
        f = await c.files.create(file=("in.jsonl", jsonl([line("a", "x")])), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert (await sim.wait_batch(b.id, "in_progress"))["status"] == "in_progress"
        assert (await sim.wait_batch(b.id, "completed"))["status"] == "completed"
        done = await c.batches.retrieve(b.id)
        assert done.status == "completed" and done.error_file_id is None
        assert len((await c.files.content(done.output_file_id)).text.splitlines()) == 1


async def test_batch_line_failures_go_to_the_error_file(anyio_backend):
    async with Simulator(SimConfig(batch_delay_s=None, batch_fail_rate=1.0)) as sim, client(sim) as c:
        f = await c.files.create(file=("in.jsonl", jsonl([line("a", "x"), line("b", "y")])), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        sim.advance_batches()
        sim.advance_batches()
        done = await c.batches.retrieve(b.id)
        assert done.request_counts.failed == 2
        err = [json.loads(x) for x in (await c.files.content(done.error_file_id)).text.splitlines()]
        assert [(e["custom_id"], e["response"]["status_code"]) for e in err] == [("a", 500), ("b", 500)]
        assert (await c.files.content(done.output_file_id)).text == ""


async def test_embeddings_batch(sim):
    lines = [{"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "text-embedding-3-small", "input": ["a b", "c d"]}}]
    async with client(sim) as c:
        f = await c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        sim.advance_batches()
        sim.advance_batches()
        done = await c.batches.retrieve(b.id)
        (out,) = [json.loads(x) for x in (await c.files.content(done.output_file_id)).text.splitlines()]
    data = out["response"]["body"]["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 384


async def test_invalid_input_file_fails_validation(sim):
    async with client(sim) as c:
        f = await c.files.create(
            file=("in.jsonl", jsonl([line("a", "x"), line("b", "y", url="/v1/embeddings")]) + b"{not json\n"),
            purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        sim.advance_batches()
        failed = await c.batches.retrieve(b.id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [("mismatched_endpoint", 2), ("invalid_json_line", 3)]


async def test_cancel_and_list(sim):
    async with client(sim) as c:
        f = await c.files.create(file=("in.jsonl", jsonl([line("a", "x")])), purpose="batch")
        ids = [(await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")).id for _ in range(3)]
        cancelled = await c.batches.cancel(ids[0])
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        sim.advance_batches()
        sim.advance_batches()
        assert (await c.batches.retrieve(ids[0])).status == "cancelled"  # stays cancelled
        assert (await c.batches.retrieve(ids[1])).status == "completed"
        page = await c.batches.list(limit=2)
        assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
        assert [b.id async for b in c.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`
        with pytest.raises(openai.BadRequestError):
            await c.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                   completion_window="24h")
