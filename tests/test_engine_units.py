"""Engine pieces in isolation: token counting, failure classification, rate windows, the cache, dedup."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys

import anyio
import orjson
import pytest

from tcia_async.config import Limits
from tcia_async.engine import retry, tokens
from fakeclock import FakeClock
from tcia_async.engine.cache import CacheBusy, CacheError, ResponseCache, key_prefix, request_key
from tcia_async.engine.client import provider_of
from tcia_async.engine.limits import Budget, BudgetTooSmall, parse_go_duration, parse_reset
from tcia_async.engine.runner import Dedup, check_request

# -- tokens ---------------------------------------------------------------------------------------------------------


def test_token_counting_is_offline_and_close_to_cl100k(monkeypatch):
    # A download attempt would go through tiktoken.load.read_file with a URL: make any such attempt fail loudly.
    import tiktoken.load as tl

    real = tl.read_file

    def no_network(blobpath):
        assert "://" not in blobpath, f"network access attempted: {blobpath}"
        return real(blobpath)

    monkeypatch.setattr(tl, "read_file", no_network)
    monkeypatch.setattr(tokens, "_count", None)  # load the encoding again, under the check
    assert tokens.count_tokens("hello world") == 2  # cl100k_base: "hello", " world"
    assert tokens.count_embedding_input(["hello world", "hello"]) == 3
    assert tokens.count_embedding_input([15339, 1917]) == 2  # token arrays count as themselves


def test_chat_prompt_count_uses_message_contents_and_upper_bound_holds():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Résumé of the meeting ✓"}]}
    exact = tokens.count_chat_prompt(body)
    assert exact == 3 + 2 * 4 + tokens.count_tokens("Be brief.") + tokens.count_tokens("Résumé of the meeting ✓")
    # The bound reserved without a tokenizer, from the JSON's length alone, holds: for empty, missing and
    # multimodal contents as well.
    for b in (body, {}, {"messages": [{"role": "user"}] * 5}, {"messages": [{"role": "user", "content": ""}]},
              {"messages": [{"role": "user", "content": [{"type": "text", "text": "Résumé ✓ " * 20}]}]}):
        size = len(orjson.dumps(b, option=orjson.OPT_SORT_KEYS))
        assert tokens.chat_prompt_bound_from_json(size) >= tokens.count_chat_prompt(b)


def test_output_estimate_learns_and_is_capped():
    est = tokens.OutputEstimator(prior=256, alpha=0.5)
    assert est.estimate("m", None) == 256
    assert est.estimate("m", 16) == 16
    est.observe("m", 100)
    est.observe("m", 50)
    assert est.estimate("m", None) == 75
    assert est.estimate("m", 10) == 10


# -- classification -------------------------------------------------------------------------------------------------


def _err(code=None, typ=None, message="x"):
    return orjson.dumps({"error": {"code": code, "type": typ, "message": message}})


@pytest.mark.parametrize("status,body,kind,code", [
    (429, _err("rate_limit_exceeded", "requests"), retry.COOLDOWN, "rate_limited"),
    (429, _err("insufficient_quota", "insufficient_quota"), retry.STOP, "insufficient_quota"),
    (429, _err("rate_limit_exceeded", "tokens", "Request too large for gpt-4 on tokens per min"), retry.FAIL,
     "request_too_large"),
    (401, _err("invalid_api_key"), retry.STOP, "unauthorized"),
    (403, _err(), retry.STOP, "forbidden"),
    (400, _err(), retry.FAIL, "bad_request"),
    (404, _err(), retry.FAIL, "not_found"),
    (422, _err(), retry.FAIL, "unprocessable"),
    (408, _err(), retry.RETRY, "timeout"),
    (409, _err(), retry.RETRY, "conflict"),
    (500, _err(), retry.RETRY, "server_error"),
    (503, b"<html>busy</html>", retry.RETRY, "server_error"),
])
def test_classification_follows_design(status, body, kind, code):
    v = retry.classify_status(status, body, {})
    assert (v.kind, v.code, v.status) == (kind, code, status)


def test_retry_after_headers():
    assert retry.retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry.retry_after({"retry-after": "2"}) == 2.0
    assert retry.retry_after({}) is None
    v = retry.classify_status(429, _err("rate_limit_exceeded"), {"retry-after-ms": "250"})
    assert v.wait == 0.25


def test_backoff_is_full_jitter_and_capped():
    import random

    rng = random.Random(1)
    waits = [retry.backoff(a, 0.5, 4.0, rng) for a in range(1, 12) for _ in range(50)]
    assert all(0.0 <= w <= 4.0 for w in waits)
    assert max(retry.backoff(1, 0.5, 4.0, rng) for _ in range(200)) <= 0.5
    assert max(retry.backoff(10, 0.5, 4.0, rng) for _ in range(200)) > 2.0


# -- limits ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,secs", [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("1m30.5s", 90.5),
                                       ("1h2m3s", 3723.0), ("250us", 0.00025), ("0s", 0.0), ("2.5", 2.5)])
def test_go_durations(text, secs):
    assert parse_go_duration(text) == pytest.approx(secs)


def test_rfc3339_reset():
    from datetime import UTC, datetime, timedelta

    when = (datetime.now(UTC) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    assert 28 < parse_reset(when) <= 30
    assert parse_go_duration("soon") is None


@pytest.mark.anyio
async def test_window_starts_full_then_waits_its_computed_time():
    clock = FakeClock()
    b = Budget(Limits(rps=20), clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        for _ in range(20):  # the whole limit at once: it starts full
            await b.acquire()
        assert clock.now() == 1000.0
        await b.acquire()  # the 21st waits until the first admissions leave the 1 s window
        assert clock.now() >= 1001.0
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_tokens_reserved_and_settled():
    b = Budget(Limits(tpm=1000), clock=FakeClock())
    ticket = await b.acquire(600)
    assert b.token_headroom() == pytest.approx(400)
    b.settle(ticket, 600, 100)  # the real usage was smaller: the difference comes back
    assert b.token_headroom() == pytest.approx(900)
    with pytest.raises(BudgetTooSmall):
        await b.acquire(1001)  # larger than the whole budget: an error, not an endless wait


@pytest.mark.anyio
async def test_cooldown_blocks_until_its_deadline():
    clock = FakeClock()
    b = Budget(Limits(rpm=1000), clock=clock)
    b.cooldown(0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        await b.acquire()
        assert clock.now() == pytest.approx(1000.2, abs=1e-3)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_header_sync_learns_limit_and_adopts_foreign_use():
    clock = FakeClock()
    b = Budget(Limits(), learn=True, clock=clock)
    await b.acquire()  # nothing configured: free
    b.sync_headers({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "2",
                    "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-limit-tokens": "1000",
                    "x-ratelimit-remaining-tokens": "990", "x-ratelimit-reset-tokens": "1s"})
    assert b.requests and b.requests[0].limit == 10
    assert b.tokens and b.counts_tokens
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        await b.acquire(5)
        await b.acquire(5)
        assert clock.now() == 1000.0
        # 8 used elsewhere + our 2: the 11th in the minute waits for the provider's reset (capped at a minute)
        await b.acquire(5)
        assert clock.now() >= 1059.0
        tg.cancel_scope.cancel()


def test_anthropic_headers():
    b = Budget(Limits())
    b.sync_headers({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "50",
                    "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z"})
    assert b.requests[0].limit == 50


# -- cache ----------------------------------------------------------------------------------------------------------


def test_key_identity():
    p = key_prefix(provider_of("https://api.openai.com/v1"), "/v1/chat/completions")
    a = orjson.dumps({"b": 1, "a": [1, 2]}, option=orjson.OPT_SORT_KEYS)
    b = orjson.dumps({"a": [1, 2], "b": 1}, option=orjson.OPT_SORT_KEYS)
    assert request_key(p, 0, a) == request_key(p, 0, b)  # key order does not matter
    assert request_key(p, 0, a) != request_key(p, 1, a)  # samples are distinct keys
    assert request_key(p, 0, a) != request_key(key_prefix("other.example", "/v1/chat/completions"), 0, a)
    assert request_key(p, 0, a) != request_key(key_prefix(provider_of("https://api.openai.com/v1"),
                                                          "/v1/embeddings"), 0, a)
    assert request_key(p, 3, a) == hashlib.blake2b(b"https://api.openai.com:443/v1\n/v1/chat/completions\n3\n" + a,
                                                   digest_size=16).digest()


@pytest.mark.parametrize("one, other", [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1"),  # two local servers: the simulator, then vLLM
    ("http://localhost:8000/v1", "https://localhost:8000/v1"),
    ("https://gateway.example/openai/v1", "https://gateway.example/azure/v1"),
    ("https://api.openai.com/v1", "https://api.together.xyz/v1"),
])
def test_two_servers_never_share_answers(one, other):
    assert provider_of(one) != provider_of(other)


@pytest.mark.parametrize("one, same", [
    ("https://api.openai.com/v1", "https://API.openai.com:443/v1/"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/"),
])
def test_spellings_of_one_server_are_one_provider(one, same):
    assert provider_of(one) == provider_of(same)


def test_cache_roundtrip_and_waiting_answers_visible(tmp_path):
    c = ResponseCache(tmp_path / "c.db", batch_rows=1000)
    k = os.urandom(16)
    c.put(k, b'{"x":1}', "req_1")
    assert c.get(k) == (b'{"x":1}', "req_1")  # visible before it is written
    c.flush()
    keys = [os.urandom(16) for _ in range(600)] + [k]
    assert c.get_many(keys) == {k: (b'{"x":1}', "req_1")}
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert c2.get(k) == (b'{"x":1}', "req_1")
    assert c2.get(os.urandom(16)) is None
    c2.close()


@pytest.mark.anyio
async def test_cache_flusher_writes_on_its_own_and_a_cancelled_one_loses_nothing(tmp_path):
    """Answers are written by the flusher without any flush() call (when a batch is full); cancelling it with
    answers waiting loses none of them (close writes them)."""
    c = ResponseCache(tmp_path / "c.db", batch_rows=64, flush_interval=60.0)
    written = []
    real_flush = c.flush
    c.flush = lambda: (written.append(len(c._waiting)), real_flush())
    async with anyio.create_task_group() as tg:
        tg.start_soon(c.run_flusher)
        for i in range(300):
            c.put(i.to_bytes(16, "big"), b'{"n":%d}' % i)
            assert c.get(i.to_bytes(16, "big")) == (b'{"n":%d}' % i, "")  # visible while waiting
            await anyio.lowlevel.checkpoint()
        assert written and all(n >= 64 for n in written)  # full batches, written without flush()
        tg.cancel_scope.cancel()
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert len(c2) == 300
    assert all(c2.get(i.to_bytes(16, "big")) == (b'{"n":%d}' % i, "") for i in range(300))
    c2.close()


def test_one_process_at_a_time(tmp_path):
    c = ResponseCache(tmp_path / "c.db")
    with pytest.raises(CacheBusy, match=r"in use by this process \(another Engine"):
        ResponseCache(tmp_path / "c.db")
    c.close()
    ResponseCache(tmp_path / "c.db").close()  # free again once closed


def test_files_that_are_not_this_cache_are_refused_untouched(tmp_path):
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE batches (id INTEGER PRIMARY KEY)")  # an earlier development format, say
    db.commit()
    db.close()
    before = other.read_bytes()
    with pytest.raises(CacheError, match="not a tcia-async cache of this version"):
        ResponseCache(other)
    assert other.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["other.db"]  # no lock file left beside it
    future = tmp_path / "future.db"
    db = sqlite3.connect(future)
    db.executescript("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL); "
                     "INSERT INTO meta VALUES ('format', 'tcia-async-cache/9');")
    db.close()
    with pytest.raises(CacheError, match="format 'tcia-async-cache/9'"):
        ResponseCache(future)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(CacheError, match="not a usable cache"):
        ResponseCache(tmp_path / "junk.db")
    assert not (tmp_path / "junk.db.lock").exists()  # refused before anything was written beside it
    with pytest.raises(CacheError, match="is a directory"):
        ResponseCache(tmp_path)


_KILLER = """
import sys
from tcia_async.engine.cache import ResponseCache
c = ResponseCache(sys.argv[1], batch_rows=100)
for i in range(10**9):
    c.put(i.to_bytes(16, "big"), b'{"n":%d}' % i)
    if len(c._waiting) >= 100:
        c.flush()
    if i == 5000:
        print("ready", flush=True)
"""


def test_cache_survives_kill_9(tmp_path):
    """A writer killed mid-run leaves a readable cache holding every written batch, and no stale lock."""
    path = tmp_path / "k.db"
    p = subprocess.Popen([sys.executable, "-c", _KILLER, str(path)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    p.kill()
    p.wait()
    c = ResponseCache(path)
    n = len(c)
    assert n >= 5000
    for i in (0, 4999, n - 1):
        assert c.get(i.to_bytes(16, "big")) == (b'{"n":%d}' % i, "")
    c.close()


def test_dedup_finds_repeats_across_chunks():
    d = Dedup()
    assert d.check([("a", 1), ("b", 2), ("a", 3)]) == {2: 1}
    assert d.check([("c", 4), ("b", 5)]) == {1: 2}
    assert d.spills == 0
    d.close()


def test_dedup_spills_to_disk_and_still_finds_every_repeat():
    """With a tiny memory bound the entries go to the temporary database again and again; ids and body counts
    are the same as if everything had stayed in memory."""
    d = Dedup(spill_at=3)
    assert d.check([("a", 1), ("b", 2)]) == {}
    assert d.occurrences([b"x", b"y", b"x"]) == [0, 0, 1]  # 5 entries: spilled
    assert d.spills == 1
    assert d.check([("a", 3), ("c", 4), ("c", 5), ("b", 6)]) == {0: 1, 2: 4, 3: 2}
    assert d.occurrences([b"x", b"z"]) == [2, 0]
    assert d.occurrences([b"x", b"y", b"z"]) == [3, 1, 1]  # counts kept across spills, not restarted
    assert d.check([("c", 7), ("d", 8)]) == {0: 4}
    assert d.spills >= 3
    assert len(d._ids) + len(d._bodies) < 3  # memory bounded
    d.close()


@pytest.mark.parametrize("value,problem", [
    ([1, 2], "not a JSON object"),
    ({"body": {}}, "custom_id"),
    ({"custom_id": "x"}, "missing body"),
    ({"custom_id": "x", "body": {}, "url": "/v1/images"}, "unsupported url"),
    ({"custom_id": "x", "body": {}, "url": ["/v1/chat/completions"]}, "unsupported url"),
    ({"custom_id": "x", "body": {}, "method": ["POST"]}, "unsupported method"),
    ({"custom_id": "x", "body": {}, "method": "GET"}, "unsupported method"),
])
def test_bad_requests_are_named(value, problem):
    assert problem in check_request(value)[3]


def test_stats_read_as_a_sentence_and_sum_over_stages_and_models():
    from tcia_async.engine.errors import EngineStats

    s = EngineStats()
    s.view("compose", "m1").ok += 2
    s.view("judge", "m2").ok += 1
    s.view("judge", "m2").failed += 1
    assert (s.ok, s.stages["judge"].failed, s.models["m1"].ok) == (3, 1, 2)
    assert str(s).startswith("3 answered (0 from the cache), 1 failed")
