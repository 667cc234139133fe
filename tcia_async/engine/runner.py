"""`generate`: Batch-format requests in, one result per custom_id out, through cache, limits and retries.

Shape (no task and no record per input line):
- a source reads requests lazily in chunks of 256, turns bad ones into error results at once (naming the line),
  computes cache keys, and looks each chunk up in the cache with one query; cached answers go straight out;
- a feeder keeps a bounded queue of the rest (at most 2 x concurrency waiting) filled;
- a fixed pool of `concurrency` worker tasks takes requests from the queue and sends them (engine.core);
- results go to a sink as they complete: a file (the CLI) or a bounded queue read by `Engine.generate`.

`Run.drain()` stops taking new requests and lets the ones in flight finish; `Run.abandon()` cancels them.
Duplicate custom_ids are found with a private temporary SQLite table, so memory stays flat in the number of lines.
"""

from __future__ import annotations

import sqlite3
from binascii import hexlify as _hexlify
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

import anyio
import msgspec
import orjson

from tcia_async.engine.cache import request_key, sql_params
from tcia_async.engine.core import CHAT, SUPPORTED_URLS, Engine
from tcia_async.engine.errors import NotSent, RequestFailed, RunStopped
from tcia_async.io import MAX_LINE_BYTES
from tcia_async.records import BatchRequest, BatchResult, ErrorOut, ResponseOut

CHUNK = 256
_URLS = {u: u for u in SUPPORTED_URLS}
_dumps = orjson.dumps
_loads = orjson.loads
_SORT = orjson.OPT_SORT_KEYS


class WorkItem(msgspec.Struct, gc=False):
    """One request ready to send: its body as canonical JSON bytes and its cache key. (A Struct: built in C, no
    Python frame per input line; untracked by the collector, as it holds no cycle.)"""

    custom_id: str
    path: str
    body: dict[str, Any]
    data: bytes
    key: bytes
    line: int


def check_request(value: Any) -> tuple[str | None, str, dict[str, Any] | None, str | None]:
    """(custom_id, url, body, problem) of one parsed input line; `problem` is None when it can be sent."""
    if not isinstance(value, dict):
        return None, "", None, "line is not a JSON object"
    cid = value.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, "", None, "missing or empty custom_id (a string)"
    url = value.get("url", CHAT)
    if type(url) is str:
        url = _URLS.get(url, url)  # the module's constants: compared with `is`
    body = value.get("body")
    if not isinstance(body, dict):
        return cid, url, None, "missing body (a JSON object)"
    if url not in SUPPORTED_URLS:
        return cid, url, None, f"unsupported url {url!r} (supported: {', '.join(SUPPORTED_URLS)})"
    method = value.get("method", "POST")
    if method != "POST":
        return cid, url, None, f"unsupported method {method!r} (only POST)"
    return cid, url, body, None


# One input line as a BatchRequest (checked by `check_batch_request`); a line it cannot decode is parsed as plain
# JSON and `check_request` says what is wrong with it.
_decode_line = msgspec.json.Decoder(BatchRequest).decode


def check_batch_request(req: BatchRequest) -> tuple[str | None, str, dict[str, Any] | None, str | None]:
    """`check_request` of a BatchRequest Struct, without building a dict first (the common case is one lookup)."""
    cid, url, body = req.custom_id, req.url, req.body
    if type(cid) is str and cid and type(body) is dict and req.method == "POST":
        u = _URLS.get(url)
        if u is not None:
            return cid, u, body, None
    return check_request({"custom_id": cid, "url": url, "body": body, "method": req.method})


class Dedup:
    """Remembers custom_ids (with the line that used each first) and how often each chat body came.

    Memory stays bounded: the entries live in two dicts until they hold `spill_at` entries together; then both are
    written, sorted, to a private temporary on-disk SQLite database and emptied. From the first spill on, each
    call also asks the database about the ids and bodies its dicts do not know (one query per 500). Below
    `spill_at` (a run of up to about 32k chat lines) no database is opened: it measured about 4 µs per line,
    the dicts about 0.2 µs.
    """

    def __init__(self, spill_at: int = 65536) -> None:
        self._ids: dict[str, int] = {}  # custom_id -> the line that used it first
        self._bodies: dict[bytes, int] = {}  # chat body key -> times seen (the database's count included)
        self._spill_at = max(1, spill_at)
        self._db: sqlite3.Connection | None = None
        self.spills = 0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect("")  # "" = private temporary database, deleted on close; pages spill to disk
        # Its contents are thrown away at the end: no rollback journal and no syncs (it is never rolled back).
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE seen (cid TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE bodies (k BLOB PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID")
        return db

    def _spill(self) -> None:
        db = self._db
        if db is None:
            db = self._db = self._open()
        with db:
            # Ids in the dict are never in the database (a known id is a repeat and is not added); a body's count
            # in the dict includes the database's, so it replaces the row. Keys as bytearrays: bound directly,
            # without the sqlite3 module's adaptation of `bytes` (about 3,000 instructions a value on 3.11).
            db.executemany("INSERT INTO seen VALUES (?, ?)", sorted(self._ids.items()))
            db.executemany("INSERT OR REPLACE INTO bodies VALUES (?, ?)",
                           [(bytearray(k), n) for k, n in sorted(self._bodies.items())])
        self._ids.clear()
        self._bodies.clear()
        self.spills += 1

    def _stored(self, table: str, column: str, keys: list[Any]) -> dict[Any, int]:
        """{key: value} of the database rows among `keys` (none before the first spill)."""
        found: dict[Any, int] = {}
        if self._db is None or not keys:
            return found
        value = "line" if table == "seen" else "n"
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            q = f"SELECT {column}, {value} FROM {table} WHERE {column} IN {sql_params(len(part))}"
            if table == "bodies":
                part = [bytearray(k) for k in part]
            for k, v in self._db.execute(q, part):
                found[k] = v  # a BLOB comes back as bytes: equal to the key
        return found

    def _maybe_spill(self) -> None:
        if len(self._ids) + len(self._bodies) >= self._spill_at:
            self._spill()

    def occurrences(self, keys: list[bytes]) -> list[int]:
        """For each key in order, how many times it was passed before, in this call or an earlier one."""
        bodies = self._bodies
        stored = self._stored("bodies", "k", [k for k in keys if k not in bodies]) if self._db is not None else {}
        out: list[int] = []
        get = bodies.get
        for k in keys:
            c = get(k)
            if c is None:
                c = stored.get(k, 0)
            out.append(c)
            bodies[k] = c + 1
        self._maybe_spill()
        return out

    def check(self, entries: list[tuple[str, int]]) -> dict[int, int]:
        """Record `(custom_id, line)` pairs in order; return {index in entries: first line} for repeats."""
        ids = self._ids
        repeats: dict[int, int] = {}
        stored = self._stored("seen", "cid", [c for c, _ in entries if c not in ids]) if self._db is not None else {}
        claim = ids.setdefault
        for i, (cid, line) in enumerate(entries):
            first = stored.get(cid) if stored else None
            if first is None:
                first = claim(cid, line)
            if first != line:
                repeats[i] = first
        self._maybe_spill()
        return repeats

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._ids.clear()
        self._bodies.clear()


# ----------------------------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------------------------


def result_id(key: bytes) -> str:
    """The result line's `id`: from the first 12 bytes of the key (FileSink.ok writes the same)."""
    return "batch_req_" + key.hex()[:24]


class QueueSink:
    """Results as BatchResult Structs in a bounded queue, for `Engine.generate`."""

    def __init__(self, limit: int) -> None:
        self.items: deque[BatchResult] = deque()
        self.limit = limit
        self.full = False
        self.finished = False
        self.error: BaseException | None = None
        self._ready: anyio.Event | None = None
        self._space: anyio.Event | None = None

    def _put(self, res: BatchResult) -> None:
        self.items.append(res)
        if len(self.items) >= self.limit:
            self.full = True
        if self._ready is not None:
            self._ready.set()
            self._ready = None

    def ok(self, item: WorkItem, raw: bytes, parsed: Any, rid: str, cached: bool) -> None:
        body = parsed if parsed is not None else _loads(raw)
        self._put(BatchResult(id=result_id(item.key), custom_id=item.custom_id,
                              response=ResponseOut(status_code=200, request_id=rid, body=body)))

    def fail(self, item: WorkItem, error: ErrorOut) -> None:
        self._put(BatchResult(id=result_id(item.key), custom_id=item.custom_id, error=error))

    def bad(self, custom_id: str | None, line: int, error: ErrorOut) -> None:
        self._put(BatchResult(id=f"batch_req_line{line}", custom_id=custom_id or "", error=error))

    def pop(self) -> BatchResult:
        res = self.items.popleft()
        if self.full and len(self.items) <= self.limit // 2:
            self.full = False
            if self._space is not None:
                self._space.set()
                self._space = None
        return res

    async def wait_space(self) -> None:
        while self.full:
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def wait(self) -> None:
        if self.items or self.finished:
            return
        if self._ready is None:
            self._ready = anyio.Event()
        await self._ready.wait()

    def wake(self) -> None:
        if self._ready is not None:
            self._ready.set()
            self._ready = None


class FileSink:
    """Results as Batch output lines appended to a binary file (the CLI). Counts what it wrote."""

    full = False

    def __init__(self, fh: Any, on_bad: Callable[[ErrorOut], None] | None = None) -> None:
        self._write = fh.write
        self._on_bad = on_bad  # told of every bad input line too (the CLI shows the first few on stderr)
        self.written = 0
        self.failed = 0

    def ok(self, item: WorkItem, raw: bytes, parsed: Any, rid: str, cached: bool) -> None:
        self._write(b'{"id":"batch_req_%s","custom_id":%s,"response":{"status_code":200,"request_id":%s,"body":%s},'
                    b'"error":null}\n' % (_hexlify(item.key[:12]), _dumps(item.custom_id), _dumps(rid), raw))
        self.written += 1

    def fail(self, item: WorkItem, error: ErrorOut) -> None:
        self._line(result_id(item.key), item.custom_id, error)

    def bad(self, custom_id: str | None, line: int, error: ErrorOut) -> None:
        self._line(f"batch_req_line{line}", custom_id, error)
        if self._on_bad is not None:
            self._on_bad(error)

    def _line(self, rid: str, custom_id: str | None, error: ErrorOut) -> None:
        err = {"code": error.code, "message": error.message, "status": error.status, "attempts": error.attempts}
        if error.line is not None:
            err["line"] = error.line
        self._write(_dumps({"id": rid, "custom_id": custom_id, "response": None, "error": err}) + b"\n")
        self.written += 1
        self.failed += 1

    async def wait_space(self) -> None:  # pragma: no cover - a file is never full
        return


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


class _Source:
    def __init__(self, engine: Engine, sink: Any, name: str) -> None:
        self._engine = engine
        self._sink = sink
        self._name = name
        self._dedup = Dedup()
        self._claims: list[tuple[str, int]] = []  # (custom_id, line) of bad lines since the last chunk
        self.lines = 0  # input lines seen (requests and bad lines)
        ep_chat = engine._chat_ep
        ep_embed = engine._embed_ep
        self._prefixes = {CHAT: ep_chat.prefixes[CHAT], "/v1/embeddings": ep_embed.prefixes["/v1/embeddings"]}

    def _bad(self, custom_id: str | None, line: int, code: str, reason: str) -> None:
        self._engine.stats.failed += 1
        if custom_id is not None and code == "bad_input":
            self._claims.append((custom_id, line))  # its result is out: a later line may not use the id again
        self._sink.bad(custom_id, line, ErrorOut(code=code, message=f"{self._name}:{line}: {reason}", line=line))

    def _finish(self, pending: list[tuple[str, str, dict[str, Any], int]]) -> list[WorkItem]:
        """Turn checked lines into work items, reporting repeated custom_ids (the first line with an id owns it,
        a bad line included)."""
        if self._claims:
            # Record the bad lines' ids in line order with the good ones; only the good ones can be repeats here.
            order = sorted([(line, cid, i) for i, (cid, _, _, line) in enumerate(pending)] +
                           [(line, cid, -1) for cid, line in self._claims])
            self._claims.clear()
            found = self._dedup.check([(cid, line) for line, cid, _ in order])
            repeats = {order[j][2]: first for j, first in found.items() if order[j][2] >= 0}
        else:
            repeats = self._dedup.check([(cid, line) for cid, _, _, line in pending])
        items: list[WorkItem] = []
        prefixes = self._prefixes
        for i, (cid, url, body, line) in enumerate(pending):
            first = repeats.get(i)
            if first is not None:
                self._bad(cid, line, "duplicate_custom_id", f"custom_id {cid!r} already used on line {first}")
                continue
            try:
                data = _dumps(body, option=_SORT)
            except TypeError as exc:
                self._bad(cid, line, "bad_input", f"body cannot be encoded as JSON ({exc})")
                continue
            items.append(WorkItem(cid, url, body, data, request_key(prefixes[url], 0, data), line))
        # Two lines with the same chat body are two samples, as in the provider's Batch API: the k-th repeat of a
        # body (counted over the whole input, so a rerun counts the same) is sample k, its own key and answer.
        # Embeddings are deterministic: repeats share one answer.
        chat = [it for it in items if it.path is CHAT]
        if chat:
            for it, k in zip(chat, self._dedup.occurrences([it.key for it in chat])):
                if k:
                    it.key = request_key(prefixes[CHAT], k, it.data)
        return items

    def close(self) -> None:
        self._dedup.close()


class FileSource(_Source):
    """Batch-format lines from a JSONL file, read lazily (blank lines are skipped; lines numbered from 1)."""

    def __init__(self, engine: Engine, path: str, sink: Any, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        super().__init__(engine, sink, str(path))
        self._fh = open(path, "rb")
        self._lineno = 0
        self._max = max_line_bytes

    async def next_chunk(self) -> list[WorkItem] | None:
        pending: list[tuple[str, str, dict[str, Any], int]] = []
        readline = self._fh.readline
        limit = self._max
        lineno = self._lineno
        n = 0
        while n < CHUNK:
            raw = readline(limit + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                while True:  # swallow the rest of the long line in bounded pieces
                    more = readline(1 << 20)
                    if not more or more.endswith(b"\n"):
                        break
                n += 1
                self._bad(None, lineno, "line_too_long", f"line longer than {limit} bytes")
                continue
            try:
                checked = check_batch_request(_decode_line(raw))
            except msgspec.DecodeError:  # also a ValidationError: parsed as plain JSON, check_request says why
                try:
                    value = _loads(raw)
                except orjson.JSONDecodeError as exc:
                    if raw.isspace():
                        continue
                    n += 1
                    self._bad(None, lineno, "bad_input", f"not valid JSON ({exc})")
                    continue
                checked = check_request(value)
            n += 1
            cid, url, body, problem = checked
            if problem is not None:
                self._bad(cid, lineno, "bad_input", problem)
            else:
                pending.append((cid, url, body, lineno))  # type: ignore[arg-type]
        self._lineno = lineno
        self.lines += n
        if n == 0:
            return None
        return self._finish(pending)

    def close(self) -> None:
        super().close()
        self._fh.close()


class RequestSource(_Source):
    """BatchRequest Structs (or dicts of the same shape) from a sync or async iterable."""

    def __init__(self, engine: Engine, requests: Iterable[Any] | AsyncIterable[Any], sink: Any) -> None:
        super().__init__(engine, sink, "<requests>")
        if hasattr(requests, "__aiter__"):
            self._ait = requests.__aiter__()  # type: ignore[union-attr]
            self._it = None
        else:
            self._ait = None
            self._it = iter(requests)  # type: ignore[arg-type]

    async def next_chunk(self) -> list[WorkItem] | None:
        pending: list[tuple[str, str, dict[str, Any], int]] = []
        n = 0
        while n < CHUNK:
            if self._it is not None:
                req = next(self._it, None)
                if req is None:
                    break
            else:
                try:
                    req = await self._ait.__anext__()  # type: ignore[union-attr]
                except StopAsyncIteration:
                    break
            n += 1
            line = self.lines + n
            if isinstance(req, BatchRequest):
                cid, url, body, problem = check_batch_request(req)
            else:
                cid, url, body, problem = check_request(req)
            if problem is not None:
                self._bad(cid, line, "bad_input", problem)
            else:
                pending.append((cid, url, body, line))  # type: ignore[arg-type]
        self.lines += n
        if n == 0:
            return None
        return self._finish(pending)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class Run:
    """One pass over a source with a fixed pool of workers. See the module docstring."""

    def __init__(self, engine: Engine, source: Any, sink: Any, workers: int | None = None) -> None:
        self.engine = engine
        self.source = source
        self.sink = sink
        self.workers = max(1, workers or engine.config.concurrency)
        self.stopped: str | None = None  # RunStopped message
        self.draining = False
        self.in_flight = 0
        self._queue: deque[WorkItem] = deque()
        self._high = max(2 * self.workers, CHUNK)
        self._low = self.workers
        self._feeding = True
        self._work_ready: anyio.Event | None = None  # set when the queue gets items or feeding ends
        self._need_more: anyio.Event | None = None  # set when the queue runs low
        self._scope: anyio.CancelScope | None = None

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._feed)
                for _ in range(self.workers):
                    tg.start_soon(self._work)
        finally:
            self.source.close()

    def drain(self) -> None:
        """Take no new requests; requests in flight finish (their results are written)."""
        self.draining = True
        self._queue.clear()
        self._wake_workers()
        if self._need_more is not None:
            self._need_more.set()

    def abandon(self) -> None:
        """Cancel everything now (requests in flight get no result; a rerun sends them)."""
        self.drain()
        if self._scope is not None:
            self._scope.cancel()

    def _wake_workers(self) -> None:
        ev = self._work_ready
        if ev is not None:
            self._work_ready = None
            ev.set()

    async def _feed(self) -> None:
        engine = self.engine
        stats = engine.stats
        sink = self.sink
        queue = self._queue
        next_chunk = self.source.next_chunk
        try:
            while not self.draining:
                while len(queue) >= self._high and not self.draining:
                    ev = self._need_more = anyio.Event()
                    await ev.wait()
                if self.draining:
                    break
                chunk = await next_chunk()
                if chunk is None:
                    break
                cache = engine.cache
                hits = cache.get_many([it.key for it in chunk]) if (cache is not None and chunk) else {}
                for it in chunk:
                    hit = hits.get(it.key)
                    if hit is not None:
                        stats.ok += 1
                        stats.cached += 1
                        sink.ok(it, hit[0], None, hit[1], True)
                    else:
                        queue.append(it)
                if queue:
                    self._wake_workers()
                if sink.full:
                    await sink.wait_space()
                # Let workers and answers in: a fully cached rerun must not hold the loop for the whole file.
                await anyio.lowlevel.checkpoint()
        finally:
            self._feeding = False
            self._wake_workers()

    async def _work(self) -> None:
        queue = self._queue
        engine = self.engine
        stats = engine.stats
        sink = self.sink
        run_item = engine._run_item
        cached_call = engine._cached_call
        plan = engine._plan
        exchange = engine._exchange
        inflight = engine._inflight
        chat_ep = engine._chat_ep
        chat_url = chat_ep.urls[CHAT]
        while True:
            if not queue:
                if not self._feeding or self.draining:
                    return
                if self._need_more is not None:
                    self._need_more.set()
                    self._need_more = None
                ev = self._work_ready
                if ev is None:
                    ev = self._work_ready = anyio.Event()
                await ev.wait()
                continue
            item = queue.popleft()
            if len(queue) < self._low and self._need_more is not None:
                self._need_more.set()
                self._need_more = None
            self.in_flight += 1
            try:
                if item.path is CHAT:
                    # The feeder looked the key up in the cache already (in batches). What `cached_call` does after
                    # that, without its frame: unless an identical request is in flight (another caller of this
                    # engine; then share its answer), plan the payment and send.
                    key = item.key
                    if key in inflight:
                        raw, parsed, rid, shared = await cached_call(chat_ep, CHAT, key, item.data, item.body, False)
                    else:
                        budget, tokens, fixed, model = plan(chat_ep, item.body, len(item.data))
                        raw, parsed, rid, _ = await exchange(chat_ep, chat_url, item.data, budget, tokens, model, True,
                                                             fixed, key)
                        shared = False
                else:
                    raw, parsed, rid, shared = await run_item(item)
            except RequestFailed as exc:
                stats.failed += 1
                sink.fail(item, exc.error)
            except RunStopped as exc:
                if self.stopped is None:
                    self.stopped = exc.message
                self.drain()
                return
            except NotSent:
                pass  # halted before it went out: no result, a rerun sends it
            else:
                stats.ok += 1
                if shared:
                    stats.cached += 1
                sink.ok(item, raw, parsed, rid, shared)
            finally:
                self.in_flight -= 1
            if sink.full:
                await sink.wait_space()
