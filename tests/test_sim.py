"""The simulator through the official openai SDK: every endpoint, typed fields, deterministic answers, ledger."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest

from tcia_async.sim import SimConfig, SimThread, Simulator
from tcia_async.sim import tokens as sim_tokens

pytestmark = pytest.mark.anyio

MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


def client(sim) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)


async def test_chat_plain_text_is_marked_simulated_and_usage_is_tiktoken_exact(sim):
    async with client(sim) as c:
        r = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=40)
    assert r.model == "gpt-4o-mini"
    assert r.system_fingerprint == "tcia-sim"
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith("[simulated]")
    # Usage is what tiktoken counts: the completion exactly, the prompt by OpenAI's per-message formula.
    assert r.usage.completion_tokens == sim_tokens.count(choice.message.content)
    assert 20 <= r.usage.completion_tokens <= 40
    expected_prompt = 3 + sum(4 + sim_tokens.count(m["content"]) for m in MSG)
    assert r.usage.prompt_tokens == expected_prompt
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


async def test_answers_are_deterministic_in_body_and_seed(sim):
    async with client(sim) as c:
        a = await c.chat.completions.create(model="m", messages=MSG, max_tokens=30)
        b = await c.chat.completions.create(model="m", messages=MSG, max_tokens=30)
        other = await c.chat.completions.create(model="m", messages=MSG, max_tokens=31)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != other.choices[0].message.content
    async with Simulator(SimConfig(seed=7)) as sim7, client(sim7) as c7:
        seeded = await c7.chat.completions.create(model="m", messages=MSG, max_tokens=30)
    assert seeded.choices[0].message.content != a.choices[0].message.content


async def test_plain_length_follows_max_tokens(sim):
    async with client(sim) as c:
        for max_tokens in (1, 2, 3, 8, 64, 300):
            r = await c.chat.completions.create(model="m", messages=MSG, max_tokens=max_tokens)
            assert max_tokens // 2 <= r.usage.completion_tokens <= max_tokens
            assert r.usage.completion_tokens == sim_tokens.count(r.choices[0].message.content)
            assert r.choices[0].message.content.startswith("[s")  # "[simulated]", cut short below 4 tokens
            assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == max_tokens)


async def test_n_choices(sim):
    async with client(sim) as c:
        r = await c.chat.completions.create(model="m", messages=MSG, max_tokens=20, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) == 3


async def test_json_schema_answer_parses_and_fits(sim):
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "count": {"type": "integer", "minimum": 2, "maximum": 5},
                       "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        "required": ["title", "count", "tags"],
        "additionalProperties": False,
    }
    async with client(sim) as c:
        r = await c.chat.completions.create(
            model="m", messages=MSG,
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                                    "strict": True}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"title", "count", "tags"}
    assert 2 <= obj["count"] <= 5 and isinstance(obj["title"], str) and len(obj["tags"]) >= 1
    assert r.usage.completion_tokens == sim_tokens.count(r.choices[0].message.content)


async def test_json_object_mode_answers_an_object(sim):
    async with client(sim) as c:
        r = await c.chat.completions.create(model="m", messages=MSG, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


async def test_bad_requests_get_openai_400s(sim):
    async with client(sim) as c:
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model="m", messages=[])
        assert e.value.status_code == 400
        with pytest.raises(openai.NotFoundError):
            await c.get("/nowhere", cast_to=object)


async def test_embeddings_float_and_base64_agree_and_are_unit_vectors(sim):
    texts = ["Summarize the meeting transcript in bullet points",
             "Summarise this meeting transcript using bullet points",
             "Write a Python function that sorts a list"]
    async with client(sim) as c:
        b64 = await c.embeddings.create(model="text-embedding-3-small", input=texts)  # SDK default: base64
        flt = await c.embeddings.create(model="text-embedding-3-small", input=texts, encoding_format="float")
        one = await c.embeddings.create(model="text-embedding-3-small", input=texts[0], dimensions=64)
    assert b64.model == "text-embedding-3-small"
    assert [d.index for d in b64.data] == [0, 1, 2]
    v = np.array([d.embedding for d in b64.data], dtype=np.float32)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(v, np.array([d.embedding for d in flt.data], dtype=np.float32), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    cos = v @ v.T
    assert cos[0, 1] > 0.3 > abs(cos[0, 2])  # shared words: near; unrelated: far
    assert len(one.data[0].embedding) == 64
    assert b64.usage.prompt_tokens == sum(sim_tokens.count(t) for t in texts)


async def test_embeddings_raw_base64_is_little_endian_float32(sim):
    async with client(sim) as c:
        raw = await c.embeddings.with_raw_response.create(model="e", input="hello", encoding_format="base64")
    data = json.loads(raw.http_response.text)
    vec = np.frombuffer(base64.b64decode(data["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5


async def test_embeddings_token_arrays(sim):
    async with client(sim) as c:
        r = await c.embeddings.create(model="e", input=[[1, 2, 3], [1, 2, 4]], encoding_format="float")
    assert len(r.data) == 2 and r.usage.prompt_tokens == 6


async def test_models(sim):
    async with client(sim) as c:
        ids = [m.id async for m in c.models.list()]
        one = await c.models.retrieve("gpt-4.1")
    assert "gpt-4o-mini" in ids and "text-embedding-3-small" in ids
    assert one.id == "gpt-4.1" and one.owned_by == "tcia-sim"


async def test_ledger_counts_duplicates_and_tokens_and_resets(sim):
    async with client(sim) as c:
        bodies = [dict(model="m", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=10) for i in range(5)]
        for b in bodies:
            await c.chat.completions.create(**b)
        usage = [(await c.chat.completions.create(**b)).usage for b in bodies[:2]]  # a resume repeating two
        await c.embeddings.create(model="e", input="x")
    s = sim.stats()
    assert s["requests"] == 8 and s["ok"] == 8 and s["by_status"] == {"200": 8}
    assert s["unique"] == 6 and s["duplicates"] == 2
    assert s["tokens"]["completion"] > sum(u.completion_tokens for u in usage)
    # The ledger keys on content: key order in the JSON body does not make a new body.
    async with client(sim) as c:
        await c.post("/chat/completions", cast_to=object,
                     body={"max_tokens": 10, "messages": [{"content": "q0", "role": "user"}], "model": "m"})
    assert sim.stats()["duplicates"] == 3
    sim.reset()
    s = sim.stats()
    assert (s["requests"], s["ok"], s["unique"], s["duplicates"], s["by_status"]) == (0, 0, 0, 0, {})


async def test_stats_and_reset_over_http(sim):
    import aiohttp

    async with client(sim) as c:
        await c.chat.completions.create(model="m", messages=MSG)
    async with aiohttp.ClientSession() as s:
        async with s.get(sim.url + "/sim/stats") as r:
            assert (await r.json())["ok"] == 1
        async with s.post(sim.url + "/sim/reset") as r:
            assert r.status == 200
        async with s.get(sim.url + "/sim/stats") as r:
            assert (await r.json())["requests"] == 0


async def test_api_key_check_gives_401(anyio_backend):
    async with Simulator(SimConfig(api_key="sk-right")) as sim:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="m", messages=MSG)
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-right", max_retries=0) as c:
            await c.chat.completions.create(model="m", messages=MSG)


def test_sim_thread_serves_sync_clients():
    with SimThread(SimConfig()) as sim:
        c = openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
        r = c.chat.completions.create(model="m", messages=MSG)
        assert r.choices[0].message.content.startswith("[simulated]")
        assert sim.stats()["ok"] == 1
        sim.reset()
        assert sim.stats()["ok"] == 0
        sim.wait_requests(0)
        with pytest.raises(TimeoutError):
            sim.wait_requests(1, timeout=0.05)
        c.models.list()
        sim.wait_requests(1, timeout=5)
    with pytest.raises(openai.APIConnectionError):  # stopped: nothing listens any more
        openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0, timeout=2).models.list()


def test_latency_model_is_base_plus_per_token_plus_bounded_jitter():
    from tcia_async.sim.server import Handlers

    h = Handlers(SimConfig(latency_ms=300, per_token_ms=2, jitter_ms=100, hang_s=5))
    delays = [h.delay_s(50) for _ in range(200)]
    assert all(0.4 <= d < 0.5 for d in delays) and len(set(delays)) > 100
    assert 5.4 <= h.delay_s(50, hang=True) < 5.5
    again = Handlers(SimConfig(latency_ms=300, per_token_ms=2, jitter_ms=100))
    assert [again.delay_s(50) for _ in range(200)] == delays  # jitter is seeded
    assert Handlers(SimConfig()).delay_s(1000) == 0.0


async def test_latency_is_applied_before_answering(anyio_backend):
    import time

    async with Simulator(SimConfig(latency_ms=150)) as sim, client(sim) as c:
        t0 = time.perf_counter()
        await c.chat.completions.create(model="m", messages=MSG)
        assert time.perf_counter() - t0 >= 0.15  # a lower bound only: the answer never comes early


async def test_shutdown_cancels_requests_in_flight(anyio_backend):
    import asyncio

    import aiohttp

    sim = Simulator(SimConfig(rate_hang=1.0, hang_s=60), shutdown_s=0.1)
    async with aiohttp.ClientSession() as s:
        async with sim:
            req = asyncio.ensure_future(s.post(sim.base_url + "/chat/completions",
                                               json={"model": "m", "messages": MSG}))
            await sim.wait_requests(1)  # the request is now inside its 60 s hang
        with pytest.raises(aiohttp.ClientError):
            await req
    assert sim.stats()["ok"] == 0


def test_sim_thread_reports_a_bind_failure():
    with SimThread(SimConfig()) as first, pytest.raises(OSError), SimThread(SimConfig(port=first.sim.port)):
        pass
