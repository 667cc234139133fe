"""Engine pieces in isolation: token counting, failure classification, rate windows, the cache, dedup."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import signal
import sys
import time

import anyio
import orjson
import pytest

from tcia_async.config import Limits
from tcia_async.engine import retry, tokens
from tcia_async.engine.cache import CacheError, ResponseCache, key_prefix, request_key
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
    count = tokens.counter_for("some-unknown-model")
    assert count("hello world") == 2  # cl100k_base: "hello", " world"
    # gpt-4o maps to o200k_base, which is not on disk here: falls back without a download.
    assert tokens.counter_for("gpt-4o")("hello world") >= 1


def test_chat_prompt_count_uses_message_contents_and_upper_bound_holds():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Résumé of the meeting ✓"}]}
    exact = tokens.count_chat_prompt(body)
    assert exact == 3 + 2 * 4 + tokens.counter_for("gpt-4o-mini")("Be brief.") + \
        tokens.counter_for("gpt-4o-mini")("Résumé of the meeting ✓")
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
async def test_window_starts_full_then_waits_computed_time():
    b = Budget(Limits(rps=20))
    t0 = time.monotonic()
    for _ in range(20):  # the whole limit at once: it starts full
        await b.acquire()
    assert time.monotonic() - t0 < 0.05
    await b.acquire()  # the 21st waits until the first admissions leave the 1 s window
    assert time.monotonic() - t0 >= 0.95


@pytest.mark.anyio
async def test_tokens_reserved_and_settled():
    b = Budget(Limits(tpm=1000))
    ticket = await b.acquire(600)
    assert b.token_headroom() == pytest.approx(400)
    b.settle(ticket, 600, 100)  # the real usage was smaller: the difference comes back
    assert b.token_headroom() == pytest.approx(900)
    with pytest.raises(BudgetTooSmall):
        await b.acquire(1001)  # larger than the whole budget: an error, not an endless wait


@pytest.mark.anyio
async def test_cooldown_blocks_until_deadline():
    b = Budget(Limits(rpm=1000))
    b.cooldown(0.2)
    t0 = time.monotonic()
    await b.acquire()
    assert time.monotonic() - t0 >= 0.19


@pytest.mark.anyio
async def test_header_sync_learns_limit_and_adopts_foreign_use():
    b = Budget(Limits(), learn=True)
    await b.acquire()  # nothing configured: free
    b.sync_headers({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "2",
                    "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-limit-tokens": "1000",
                    "x-ratelimit-remaining-tokens": "990", "x-ratelimit-reset-tokens": "1s"})
    assert b.requests and b.requests[0].limit == 10
    assert b.tokens and b.counts_tokens
    await b.acquire(5)
    await b.acquire(5)
    # 8 used elsewhere + our 2: the 11th in the minute waits for the provider's reset
    with anyio.move_on_after(0.2) as scope:
        await b.acquire(5)
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_anthropic_headers():
    b = Budget(Limits())
    b.sync_headers({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "50",
                    "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z"})
    assert b.requests[0].limit == 50


@pytest.mark.anyio
async def test_waiters_are_served_in_order():
    b = Budget(Limits(rps=5))
    for _ in range(5):
        await b.acquire()
    order = []

    async def one(i):
        await b.acquire()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(one, i)
            await anyio.sleep(0)
    assert order == list(range(5))


# -- cache ----------------------------------------------------------------------------------------------------------


def test_key_identity():
    p = key_prefix("api.openai.com", "/v1/chat/completions")
    a = orjson.dumps({"b": 1, "a": [1, 2]}, option=orjson.OPT_SORT_KEYS)
    b = orjson.dumps({"a": [1, 2], "b": 1}, option=orjson.OPT_SORT_KEYS)
    assert request_key(p, 0, a) == request_key(p, 0, b)  # key order does not matter
    assert request_key(p, 0, a) != request_key(p, 1, a)  # samples are distinct keys
    assert request_key(p, 0, a) != request_key(key_prefix("other.example", "/v1/chat/completions"), 0, a)
    assert request_key(p, 0, a) != request_key(key_prefix("api.openai.com", "/v1/embeddings"), 0, a)
    # The format is fixed (caches written by earlier versions stay valid): BLAKE2b-128 of provider, path, sample
    # and canonical body, each of the first three ending in a newline.
    assert request_key(p, 3, a) == hashlib.blake2b(b"api.openai.com\n/v1/chat/completions\n3\n" + a,
                                                   digest_size=16).digest()


def test_cache_roundtrip_and_pending_visible(tmp_path):
    c = ResponseCache(tmp_path / "c.db", batch_rows=1000)
    k = os.urandom(16)
    c.put(k, b'{"x":1}', "req_1")
    assert c.get(k) == (b'{"x":1}', "req_1")  # visible before the flush
    c.flush()
    keys = [os.urandom(16) for _ in range(600)] + [k]
    assert c.get_many(keys) == {k: (b'{"x":1}', "req_1")}
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert c2.get(k) == (b'{"x":1}', "req_1")
    assert c2.get(os.urandom(16)) is None
    c2.close()


@pytest.mark.anyio
async def test_cache_flusher_commits_on_its_own_and_a_cancelled_one_loses_nothing(tmp_path):
    """Rows are committed by the flusher without any flush() call; cancelling it with rows waiting still commits
    every row."""
    c = ResponseCache(tmp_path / "c.db", batch_rows=64, flush_interval=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(c.run_flusher)
        c.put(b"k" * 16, b'{"first":1}', "req_0")
        with anyio.fail_after(10):
            while c.writes < 1:  # committed by the flusher after the flush interval
                await anyio.sleep(0.005)
        for i in range(300):
            c.put(i.to_bytes(16, "big"), b'{"n":%d}' % i)
            assert c.get(i.to_bytes(16, "big")) == (b'{"n":%d}' % i, "")  # visible while waiting
            if i % 7 == 0:
                await anyio.sleep(0)  # lets the flusher start batches mid-way
        tg.cancel_scope.cancel()
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert len(c2) == 301
    assert c2.get(b"k" * 16) == (b'{"first":1}', "req_0")
    assert all(c2.get(i.to_bytes(16, "big")) == (b'{"n":%d}' % i, "") for i in range(300))
    c2.close()


def _answer(i: int) -> tuple[bytes, str]:
    return b'{"n":%d}' % i, f"req_{i}"


def _lookup_rows(c: ResponseCache) -> int:
    return c._db.execute("SELECT count(*) FROM lookup").fetchone()[0]


def test_cache_finds_answers_in_every_state(tmp_path):
    """An answer is found while it waits in memory, once committed but not indexed, once indexed, and after a
    close and reopen, alone or with keys in the other states in one call; merges happen every `merge_rows`."""
    c = ResponseCache(tmp_path / "c.db", batch_rows=7, merge_rows=20)
    keys = [os.urandom(16) for _ in range(53)]
    for i, k in enumerate(keys):
        c.put(k, *_answer(i))
        if i % 5 == 0:  # lookups in every state along the way
            seen = keys[: i + 1]
            assert c.get_many(seen) == {k2: _answer(j) for j, k2 in enumerate(seen)}
    # 53 answers: 7 batches of 7 committed (two merges of 21), 4 waiting.
    assert _lookup_rows(c) == 42
    waiting = [k for k in keys if k in c._pending]
    unindexed = [k for k in keys if k in c._recent]
    assert len(waiting) == 4 and len(unindexed) == 7
    indexed = [k for k in keys if k not in c._pending and k not in c._recent]
    for group in (waiting, unindexed, indexed):
        for k in group:
            assert c.get(k) == _answer(keys.index(k))
        c._memo.clear()  # each group read from the file, not from batches read for the previous one
    assert c.get_many(keys + [os.urandom(16)]) == {k: _answer(i) for i, k in enumerate(keys)}
    assert c.get(os.urandom(16)) is None
    assert len(c) == 53  # writes the waiting answers
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert _lookup_rows(c2) == 53  # close indexed the rest
    assert c2._db.execute("SELECT count(*), sum(n) FROM batches").fetchone() == (8, 53)  # one row per flush
    assert c2.get_many(keys + [os.urandom(16)]) == {k: _answer(i) for i, k in enumerate(keys)}
    assert sorted(c2.keys()) == sorted(keys)
    c2.close()


def test_cache_compares_whole_keys(tmp_path):
    """The index holds a key's first 8 bytes only: keys sharing them are told apart in every state, and one
    that was never put is not found through the other."""
    a, b, absent = b"\x01" * 8 + b"A" * 8, b"\x01" * 8 + b"B" * 8, b"\x01" * 8 + b"C" * 8
    c = ResponseCache(tmp_path / "c.db", batch_rows=1000, merge_rows=1000)
    c.put(a, b'{"a":1}', "ra")
    assert c.get_many([b, absent]) == {}  # waiting
    c.flush()
    assert c.get_many([b, absent]) == {}  # committed, not indexed
    c._merge()
    assert c.get_many([b, absent]) == {}  # indexed
    c.put(b, b'{"b":1}', "rb")
    c.flush()
    c._merge()
    assert _lookup_rows(c) == 2
    c._memo.clear()
    assert c.get_many([a, b, absent]) == {a: (b'{"a":1}', "ra"), b: (b'{"b":1}', "rb")}
    assert c.get_many([absent]) == {}
    d, e = b"\x02" * 8 + b"D" * 8, b"\x02" * 8 + b"E" * 8
    c.put(d, b"d")
    c.put(e, b"e")
    c.flush()
    c._merge()  # one sorted pass holding two equal `h`
    assert _lookup_rows(c) == 4
    with pytest.raises(ValueError, match="16 bytes"):
        c.put(b"short", b"x")
    assert c.get_many([b"short", a[:8]]) == {}  # keys of another length are never found
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert c2.get_many([a, b, absent, d, e]) == {a: (b'{"a":1}', "ra"), b: (b'{"b":1}', "rb"), d: (b"d", ""),
                                                 e: (b"e", "")}
    c2.close()


def test_cache_keeps_request_ids_and_bodies_exactly(tmp_path):
    """Request ids come back as they went in (empty, non-ASCII, with a newline, with a lone surrogate as aiohttp
    decodes a stray byte), and so do bodies of any size, including empty."""
    rids = ["", "req_1", "", "ïd-ü", "two\nlines", "bad\udcff", "\ud83d", ""]
    bodies = [b"", b"x" * 100_000, b"{}", b"\x00\xff", b"y", b"z" * 7, b"", b"last"]
    keys = [os.urandom(16) for _ in rids]
    c = ResponseCache(tmp_path / "c.db")
    for k, body, rid in zip(keys, bodies, rids):
        c.put(k, body, rid)
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert c2.get_many(keys) == {k: (body, rid) for k, body, rid in zip(keys, bodies, rids)}
    c2.close()


def test_cache_splits_a_huge_batch_into_rows(tmp_path, monkeypatch):
    """A batch past the bytes or answers one row may hold is written as several rows, in one transaction."""
    import tcia_async.engine.cache as cache_mod

    monkeypatch.setattr(cache_mod, "_ROW_BYTES", 1000)
    c = ResponseCache(tmp_path / "c.db", batch_rows=10_000)
    keys = [os.urandom(16) for _ in range(40)]
    for i, k in enumerate(keys):
        c.put(k, b"%03d" % i + b"." * (i * 30))
    c.flush()
    rows = c._db.execute("SELECT n, length(bodies) FROM batches ORDER BY id").fetchall()
    assert len(rows) > 10 and sum(n for n, _ in rows) == 40
    assert all(size <= 1000 or n == 1 for n, size in rows)
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert c2.get_many(keys) == {k: (b"%03d" % i + b"." * (i * 30), "") for i, k in enumerate(keys)}
    c2.close()


def test_cache_reads_each_batch_once_and_bounds_what_it_keeps(tmp_path, monkeypatch):
    """Lookups read a batch row once for all the keys they find in it; batches read lately are kept for the next
    lookups up to a size, the oldest dropped first."""
    import tcia_async.engine.cache as cache_mod

    c = ResponseCache(tmp_path / "c.db", batch_rows=50)
    keys = [os.urandom(16) for _ in range(500)]
    for i, k in enumerate(keys):
        c.put(k, b"%d" % i + b" " * 200)
    c.close()
    c = ResponseCache(tmp_path / "c.db")
    reads = []
    c._db.set_trace_callback(lambda sql: reads.append(sql) if "FROM batches" in sql else None)
    assert len(c.get_many(keys[:120])) == 120
    assert len(reads) == 1  # one query for three batches
    assert sorted(c._memo) == [1, 2, 3]
    assert all(c.get(k) is not None for k in keys[100:150])
    assert len(reads) == 1  # the third batch was kept
    monkeypatch.setattr(cache_mod, "_MEMO_BYTES", 25_000)  # two batches of 50 answers of ~203 bytes
    c._memo.clear()
    c._memo_bytes = 0
    assert c.get_many(keys[::-1]) == {k: (b"%d" % i + b" " * 200, "") for i, k in enumerate(keys)}
    assert len(c._memo) == 2 and c._memo_bytes <= 25_000
    c.close()


def test_cache_indexes_a_killed_runs_batches_at_open(tmp_path):
    """Batches a run committed and never indexed (killed before its merge) are indexed by the next open, which
    then finds them through `lookup` alone."""
    path = tmp_path / "c.db"
    code = ("import os, sys\n"
            "from tcia_async.engine.cache import ResponseCache\n"
            "c = ResponseCache(sys.argv[1], batch_rows=10, merge_rows=10**6)\n"
            "for i in range(95):\n"
            "    c.put(i.to_bytes(16, 'big'), b'{\"n\":%d}' % i, 'r%d' % i)\n"
            "os._exit(0)\n")  # no close: 9 batches committed, 5 answers waiting, nothing indexed
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    c = ResponseCache(path)
    assert not c._recent
    assert _lookup_rows(c) == 90
    mark = c._db.execute("SELECT value FROM meta WHERE name = 'indexed_upto'").fetchone()[0]
    assert mark == "9"
    assert c.get_many([i.to_bytes(16, "big") for i in range(95)]) == {
        i.to_bytes(16, "big"): (b'{"n":%d}' % i, f"r{i}") for i in range(90)}
    c.close()


def test_cache_shared_by_two_processes_indexes_the_others_batches(tmp_path):
    """A merge indexes every batch past the mark, not only its own: batches of another cache on the same file
    that never merges (killed) are found by a third."""
    path = tmp_path / "c.db"
    a = ResponseCache(path, batch_rows=5, merge_rows=10**6)
    b = ResponseCache(path, batch_rows=5, merge_rows=10)
    ka = [os.urandom(16) for _ in range(20)]
    kb = [os.urandom(16) for _ in range(20)]
    for i in range(20):
        a.put(ka[i], b"a%d" % i)
        b.put(kb[i], b"b%d" % i)
    assert _lookup_rows(b) == 40  # b's merges took a's batches too
    a._db.close()  # a killed: its own map is lost
    b.close()
    c = ResponseCache(path)
    assert c.get_many(ka + kb) == {**{k: (b"a%d" % i, "") for i, k in enumerate(ka)},
                                   **{k: (b"b%d" % i, "") for i, k in enumerate(kb)}}
    c.close()


def test_cache_of_the_previous_format_is_upgraded_in_place(tmp_path):
    """A cache written by the version that indexed `responses` itself (format 2) opens, keeps every answer and
    drops its old table and index."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("""
        CREATE TABLE responses (id INTEGER PRIMARY KEY, h INTEGER NOT NULL, key BLOB NOT NULL, body BLOB NOT NULL,
                                request_id TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
        CREATE INDEX responses_h ON responses(h);
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('version', '2');
    """)
    keys = [os.urandom(16) for _ in range(30)]
    db.executemany("INSERT INTO responses (h, key, body, request_id, created) VALUES (?, ?, ?, ?, 0)",
                   [(int.from_bytes(k[:8], "little", signed=True), k, b'{"n":%d}' % i, "") for i, k in enumerate(keys)])
    db.close()
    c = ResponseCache(path)
    assert c.get_many(keys) == {k: (b'{"n":%d}' % i, "") for i, k in enumerate(keys)}
    assert c._db.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('responses', 'responses_h')"
                         ).fetchone()[0] == 0
    assert c._db.execute("SELECT count(*), sum(n) FROM batches").fetchone() == (1, 30)
    assert c._db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0] == "4"
    c.close()
    c2 = ResponseCache(path)
    assert c2.get(keys[17]) == (b'{"n":17}', "")
    c2.close()
    # Without its mark of what is indexed, a file is indexed again from the start: nothing is lost.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM meta WHERE name = 'indexed_upto'")
    db.execute("DELETE FROM lookup")
    db.close()
    c3 = ResponseCache(path)
    assert _lookup_rows(c3) == 30
    assert c3.get_many(keys) == {k: (b'{"n":%d}' % i, "") for i, k in enumerate(keys)}
    c3.close()


_FORMAT3 = """
    CREATE TABLE responses (id INTEGER PRIMARY KEY, h INTEGER NOT NULL, key BLOB NOT NULL, body BLOB NOT NULL,
                            request_id TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
    CREATE TABLE lookup (h INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (h, id)) WITHOUT ROWID;
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('version', '3');
"""


def _write_format3(path, keys: list[bytes], indexed: int) -> None:
    """A format-3 file as that version wrote it: a row per answer, three flushes (one `created` each), the first
    `indexed` rows in its `lookup` (a killed run left the rest)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(_FORMAT3)
    db.executemany("INSERT INTO responses (h, key, body, request_id, created) VALUES (?, ?, ?, ?, ?)",
                   [(int.from_bytes(k[:8], "little", signed=True), k, b'{"n":%d}' % i, f"req_{i}" if i % 3 else "",
                     1000.0 + i // 100) for i, k in enumerate(keys)])
    db.execute("INSERT INTO lookup SELECT h, id FROM responses WHERE id <= ? ORDER BY h", (indexed,))
    db.execute("INSERT INTO meta VALUES ('indexed_upto', ?)", (str(indexed),))
    db.close()


def _format3_answers(keys: list[bytes]) -> dict[bytes, tuple[bytes, str]]:
    return {k: (b'{"n":%d}' % i, f"req_{i}" if i % 3 else "") for i, k in enumerate(keys)}


def test_cache_of_format_3_is_upgraded_in_place(tmp_path):
    """A format-3 file (a row per answer, partly indexed) is converted at open: every answer is kept, rows of one
    old flush share a batch, the old tables go, and the new format survives a reopen."""
    path = tmp_path / "old3.db"
    keys = [os.urandom(16) for _ in range(250)]
    _write_format3(path, keys, indexed=180)
    c = ResponseCache(path)
    db = c._db
    assert db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0] == "4"
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'responses'").fetchone()[0] == 0
    assert db.execute("SELECT n, created FROM batches ORDER BY id").fetchall() == [(100, 1000.0), (100, 1001.0),
                                                                                    (50, 1002.0)]
    assert _lookup_rows(c) == 250
    assert not c._recent
    assert c.get_many(keys) == _format3_answers(keys)
    new = os.urandom(16)
    c.put(new, b"new", "r")
    c.close()
    c2 = ResponseCache(path)
    assert c2.get_many(keys + [new]) == {**_format3_answers(keys), new: (b"new", "r")}
    assert len(c2) == 251
    c2.close()


def test_cache_conversion_interrupted_leaves_the_old_file(tmp_path, monkeypatch):
    """A conversion that fails part-way changes nothing (one transaction): the file is still format 3 with every
    answer, and the next open converts it."""
    import tcia_async.engine.cache as cache_mod

    path = tmp_path / "old3.db"
    keys = [os.urandom(16) for _ in range(250)]
    _write_format3(path, keys, indexed=250)

    def fail(db, flat):
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(cache_mod, "_insert_lookup", fail)
    with pytest.raises(cache_mod.CacheError, match="simulated"):
        ResponseCache(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0] == "3"
    assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == 250
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'batches'").fetchone()[0] == 0
    db.close()
    monkeypatch.undo()
    c = ResponseCache(path)
    assert c.get_many(keys) == _format3_answers(keys)
    c.close()
    c2 = ResponseCache(path)  # opening a converted file again converts nothing
    assert c2._db.execute("SELECT count(*) FROM batches").fetchone()[0] == 3
    assert c2.get_many(keys) == _format3_answers(keys)
    c2.close()


def test_cache_of_an_unknown_format_is_refused(tmp_path):
    path = tmp_path / "new.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL); "
                     "INSERT INTO meta VALUES ('version', '5');")
    db.close()
    with pytest.raises(CacheError, match="cache format 5, this version reads 4"):
        ResponseCache(path)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(CacheError, match="not a usable cache database"):
        ResponseCache(tmp_path / "junk.db")


_KILLER = """
import os, sys, signal
from tcia_async.engine.cache import ResponseCache
c = ResponseCache(sys.argv[1], batch_rows=100)
for i in range(10**9):
    c.put(i.to_bytes(16, "big"), b'{"n":%d}' % i)
    if i == 5000:
        print("ready", flush=True)
"""


def test_cache_survives_kill_9(tmp_path):
    """A writer killed mid-batch leaves a readable cache holding every committed row."""
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


# -- the writer process --------------------------------------------------------------------------------------------


def test_cache_writer_process_keeps_answers_visible_and_writes_them_all(tmp_path):
    """writer="process": answers handed to the child are found in every state (waiting here, sent, indexed
    there), and all of them are in the file after close."""
    path = tmp_path / "c.db"
    c = ResponseCache(path, batch_rows=10, merge_rows=30, writer="process")
    keys = [os.urandom(16) for _ in range(205)]
    for i, k in enumerate(keys):
        c.put(k, b'{"n":%d}' % i, f"r{i}")
        if i % 50 == 0:
            assert c.get(keys[i]) == (b'{"n":%d}' % i, f"r{i}")  # waiting here
            assert c.get(keys[0]) == (b'{"n":0}', "r0")
    assert c._writer is not None and c._writer.sent == 20
    assert c.get_many(keys) == {k: (b'{"n":%d}' % i, f"r{i}") for i, k in enumerate(keys)}
    c.close()
    assert c._writer.proc.returncode == 0
    c2 = ResponseCache(path)
    assert len(c2) == 205 and _lookup_rows(c2) == 205  # written and indexed by the child
    assert c2.get_many(keys) == {k: (b'{"n":%d}' % i, f"r{i}") for i, k in enumerate(keys)}
    c2.close()


def test_cache_writer_process_survives_its_parent_killed(tmp_path):
    """kill -9 of the process using the cache: the writer child still writes and indexes every answer it was
    handed (its reports of merges now go nowhere: it must carry on), and a Ctrl-C at the terminal (SIGINT to the
    parent's process group) does not reach it."""
    path = tmp_path / "c.db"
    pidfile = tmp_path / "writer.pid"
    code = ("import os, signal, sys\n"
            "from tcia_async.engine.cache import ResponseCache\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "c = ResponseCache(sys.argv[1], batch_rows=10, merge_rows=20, writer='process')\n"
            "open(sys.argv[2], 'w').write(str(c._writer.proc.pid))\n"
            "os.killpg(os.getpgrp(), signal.SIGINT)\n"  # the terminal's Ctrl-C, while the child starts
            "for i in range(95):\n"
            "    c.put(i.to_bytes(16, 'big'), b'{\"n\":%d}' % i, 'r%d' % i)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")  # 9 batches handed over, 5 answers waiting here
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(pidfile)], start_new_session=True)
    assert proc.returncode == -signal.SIGKILL
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the writer process did not exit after its parent died")
    c = ResponseCache(path)
    assert len(c) == 90 and _lookup_rows(c) == 90  # written and indexed by the orphaned child
    assert c.get_many([i.to_bytes(16, "big") for i in range(95)]) == {
        i.to_bytes(16, "big"): (b'{"n":%d}' % i, f"r{i}") for i in range(90)}
    c.close()


def test_cache_writer_process_failure_is_a_clear_error(tmp_path):
    """A writer child that dies makes the next hand-over (or close) raise CacheError instead of losing answers
    silently, and close does not hang."""
    c = ResponseCache(tmp_path / "c.db", batch_rows=5, writer="process")
    c._writer.proc.kill()
    c._writer.proc.wait()
    with pytest.raises(CacheError, match="writer process"):
        for i in range(50):
            c.put(os.urandom(16), b"{}")
    with pytest.raises(CacheError):
        c.close()
    with pytest.raises(ValueError, match="writer"):
        ResponseCache(tmp_path / "d.db", writer="thread")


def test_cache_writes_inline_where_no_process_can_start(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("no processes here")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    c = ResponseCache(tmp_path / "c.db", batch_rows=5, writer="process")
    assert c._writer is None
    keys = [os.urandom(16) for _ in range(12)]
    for k in keys:
        c.put(k, b"{}")
    c.close()
    c2 = ResponseCache(tmp_path / "c.db")
    assert len(c2) == 12 and set(c2.get_many(keys)) == set(keys)
    c2.close()
