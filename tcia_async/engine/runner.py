"""`generate`: Batch-format requests in, one result per line out, through the engine's one request path.

Shape (no task per input line):
- a source reads requests lazily in chunks of up to 256 (a file through io.iter_jsonl; an async iterable as its
  items come), turns bad lines into error results at once (naming the line) and computes cache keys; each
  chunk is looked up in the cache with one query; cached answers go straight out;
- a feeder keeps a bounded queue of the rest filled (at most 2 x workers waiting);
- a fixed pool of `concurrency` workers takes requests from the queue and sends them (request.py; a worker
  waiting for its model's budget holds no connection slot);
- results go to a sink as they complete: a file (the CLI) or a bounded queue read by `Engine.generate`.

`Run.drain()` stops taking new requests and lets the ones in flight finish; `Run.abandon()` cancels the waits.
Repeated custom_ids are found with `Dedup`, whose memory stays flat in the number of lines.
"""

from __future__ import annotations

import os
import sqlite3
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import anyio
import msgspec
import orjson

from tcia_async.engine.cache import sql_params
from tcia_async.engine.errors import NotSent, RequestFailed, RunStopped, primary
from tcia_async.engine.request import CHAT, Answer, Requests, canonical, unsupported_url
from tcia_async.io import MAX_LINE_BYTES, BadLine, Line, iter_jsonl
from tcia_async.records import BatchRequest, BatchResult, ErrorOut, ResponseOut

CHUNK = 256
_END = object()

# embedding_entry(body, key, stage) -> a future of the line's PackResult (Engine.embedding_entry)
EmbedEntry = Callable[[dict[str, Any], bytes, str], Awaitable[Any]]


class WorkItem(msgspec.Struct, gc=False):
    """One request ready to send: its body as canonical JSON bytes and its cache key."""

    custom_id: str
    path: str
    body: dict[str, Any]
    data: bytes
    key: bytes
    line: int


def check_request(value: Any) -> tuple[Any, str, dict[str, Any] | None, str | None]:
    """(custom_id as written, url, body, problem) of one parsed input line; `problem` is None when it can be
    sent."""
    if not isinstance(value, dict):
        return None, "", None, "line is not a JSON object"
    cid = value.get("custom_id")
    if not isinstance(cid, str) or not cid:
        what = "missing" if cid is None else f"{orjson.dumps(cid).decode()[:80]} is not a non-empty string"
        return cid, "", None, f"custom_id {what} (a non-empty string is required)"
    url = value.get("url", CHAT)
    body = value.get("body")
    if not isinstance(body, dict):
        return cid, str(url), None, "missing body (a JSON object)"
    why = unsupported_url(url)
    if why:
        return cid, str(url), None, why
    method = value.get("method", "POST")
    if method != "POST":
        return cid, url, None, f"unsupported method {method!r} (only POST)"
    return cid, url, body, None


_decode_line = msgspec.json.Decoder(BatchRequest).decode


class Dedup:
    """Remembers custom_ids (with the line that used each first) and how often each chat body came.

    Memory stays bounded: the entries live in two dicts until they hold `spill_at` entries together; then both
    are written to a private temporary on-disk SQLite database and emptied; from then on each call also asks
    the database about what its dicts do not know.
    """

    def __init__(self, spill_at: int = 65536) -> None:
        self._ids: dict[str, int] = {}  # custom_id -> the line that used it first
        self._bodies: dict[bytes, int] = {}  # chat body key -> times seen (the database's count included)
        self._spill_at = max(1, spill_at)
        self._db: sqlite3.Connection | None = None
        self.spills = 0

    def _spill(self) -> None:
        if self._db is None:
            self._db = sqlite3.connect("")  # "": a private temporary database, deleted on close
            self._db.execute("PRAGMA journal_mode=OFF")
            self._db.execute("CREATE TABLE seen (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID")
            self._db.execute("CREATE TABLE bodies (k BLOB PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID")
        with self._db:
            # An id in the dict is never in the database; a body's count in the dict includes the database's.
            self._db.executemany("INSERT INTO seen VALUES (?, ?)", self._ids.items())
            self._db.executemany("INSERT OR REPLACE INTO bodies VALUES (?, ?)", self._bodies.items())
        self._ids.clear()
        self._bodies.clear()
        self.spills += 1

    def _stored(self, table: str, keys: list[Any]) -> dict[Any, int]:
        found: dict[Any, int] = {}
        if self._db is None:
            return found
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            for k, v in self._db.execute(f"SELECT k, v FROM {table} WHERE k IN {sql_params(len(part))}", part):
                found[k] = v
        return found

    def occurrences(self, keys: list[bytes]) -> list[int]:
        """For each key in order, how many times it was passed before, in this call or an earlier one."""
        bodies = self._bodies
        stored = self._stored("bodies", [k for k in keys if k not in bodies])
        out: list[int] = []
        for k in keys:
            c = bodies.get(k)
            if c is None:
                c = stored.get(k, 0)
            out.append(c)
            bodies[k] = c + 1
        if len(self._ids) + len(bodies) >= self._spill_at:
            self._spill()
        return out

    def check(self, entries: list[tuple[str, int]]) -> dict[int, int]:
        """Record `(custom_id, line)` pairs in order; return {index in entries: first line} for repeats."""
        ids = self._ids
        stored = self._stored("seen", [c for c, _ in entries if c not in ids])
        repeats: dict[int, int] = {}
        for i, (cid, line) in enumerate(entries):
            first = stored.get(cid)
            if first is None:
                first = ids.setdefault(cid, line)
            if first != line:
                repeats[i] = first
        if len(ids) + len(self._bodies) >= self._spill_at:
            self._spill()
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
    """The result line's `id`, from the first 12 bytes of the request's key."""
    return "batch_req_" + key[:12].hex()


class QueueSink:
    """Results as BatchResult Structs in a bounded queue, for `Engine.generate`."""

    def __init__(self, limit: int) -> None:
        self._items: deque[BatchResult] = deque()
        self.limit = limit
        self.done = False
        self.error: BaseException | None = None
        self._changed = anyio.Event()

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _put(self, res: BatchResult) -> None:
        self._items.append(res)
        self._notify()

    def ok(self, item: WorkItem, answer: Answer) -> None:
        self._put(BatchResult(id=result_id(item.key), custom_id=item.custom_id,
                              response=ResponseOut(status_code=200, request_id=answer.request_id,
                                                   body=answer.parsed())))

    def fail(self, item: WorkItem, error: ErrorOut) -> None:
        self._put(BatchResult(id=result_id(item.key), custom_id=item.custom_id, error=error))

    def bad(self, custom_id: Any, line: int, error: ErrorOut) -> None:
        self._put(BatchResult(id=f"batch_req_line{line}", custom_id=custom_id, error=error))

    def finish(self) -> None:
        self.done = True
        self._notify()

    async def get(self) -> BatchResult | None:
        """The next result, or None once the run has finished and every result was taken."""
        while not self._items:
            if self.done:
                return None
            await self._changed.wait()
        res = self._items.popleft()
        self._notify()
        return res

    async def wait_space(self) -> None:
        while self.full and not self.done:
            await self._changed.wait()


class FileSink:
    """Results as Batch output lines appended to a binary file (the CLI). Counts what it wrote, by outcome."""

    full = False

    def __init__(self, fh: Any, on_bad: Callable[[ErrorOut], None] | None = None) -> None:
        self._write = fh.write
        self._on_bad = on_bad  # told of every bad input line too (the CLI names the first few on stderr)
        self.written = 0
        self.failed = 0
        self.by_code: dict[str, int] = {}

    def ok(self, item: WorkItem, answer: Answer) -> None:
        self._write(b'{"id":"%s","custom_id":%s,"response":{"status_code":200,"request_id":%s,"body":%s},'
                    b'"error":null}\n' % (result_id(item.key).encode(), orjson.dumps(item.custom_id),
                                          orjson.dumps(answer.request_id), answer.raw))
        self.written += 1

    def fail(self, item: WorkItem, error: ErrorOut) -> None:
        self._line(result_id(item.key), item.custom_id, error)

    def bad(self, custom_id: Any, line: int, error: ErrorOut) -> None:
        self._line(f"batch_req_line{line}", custom_id, error)
        if self._on_bad is not None:
            self._on_bad(error)

    def _line(self, rid: str, custom_id: Any, error: ErrorOut) -> None:
        self._write(orjson.dumps({"id": rid, "custom_id": custom_id, "response": None,
                                  "error": msgspec.to_builtins(error)}) + b"\n")
        self.written += 1
        self.failed += 1
        self.by_code[error.code] = self.by_code.get(error.code, 0) + 1

    async def wait_space(self) -> None:  # a file is never full
        return


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


class Source:
    """Batch-format requests for a run, in chunks of CHUNK work items, from a sync or async iterable of
    BatchRequest Structs, dicts of the same shape, or the `Line`/`BadLine` items of io.iter_jsonl (a file:
    see `FileSource`). A line that cannot be sent becomes an error result at once, naming `name` and its line
    (an item's position, counted from 1, where it has no line number)."""

    def __init__(self, requests: Requests, items: Iterable[Any] | AsyncIterable[Any], sink: Any,
                 name: str = "<requests>", stage: str = "generate") -> None:
        self._requests = requests
        self._sink = sink
        self._name = name
        self._stage = stage
        self._dedup = Dedup()
        self._claims: list[tuple[str, int]] = []  # (custom_id, line) of bad lines since the last chunk
        self._ait = items.__aiter__() if hasattr(items, "__aiter__") else None  # type: ignore[union-attr]
        self._it = None if self._ait is not None else iter(items)  # type: ignore[arg-type]
        # An async iterable is read by `pump` (a task of the run) into this buffer, so that a chunk holds what
        # has come so far: a slow producer's requests go out as they come, not 256 at a time.
        if self._ait is not None:
            self._put, self._items = anyio.create_memory_object_stream[Any](CHUNK)
        self._pumping: anyio.CancelScope | None = None  # the pump's scope while it runs
        self._stopped = False
        self._failed: Exception | None = None  # what the producer raised
        self.lines = 0  # input lines seen (requests and bad lines)

    async def pump(self) -> None:
        """Read an async iterable into the buffer until it ends or `stop()` (Run starts this in its task group)."""
        if self._ait is None or self._stopped:
            return
        with anyio.CancelScope() as self._pumping:
            async with self._put:
                try:
                    async for item in self._ait:
                        try:
                            self._put.send_nowait(item)  # no pause per item: a fast producer fills whole chunks
                        except anyio.WouldBlock:
                            await self._put.send(item)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the run takes no more (stop)
                except Exception as exc:  # the producer failed: next_chunk raises it after the items before it
                    self._failed = exc

    def stop(self) -> None:
        """The run takes no more items: stop reading an async iterable."""
        self._stopped = True
        if self._pumping is not None:
            self._pumping.cancel()
        if self._ait is not None:
            self._put.close()
            self._items.close()

    async def next_chunk(self) -> list[WorkItem] | None:
        """The next chunk of work items, or None at the end. A producer's exception is raised here, once the items
        it made before it have been returned."""
        if self._failed is not None and self._it is not None:
            raise self._failed  # a failed iterator is not asked again (an async one's buffer is read to its end)
        pending: list[tuple[str, str, dict[str, Any], int]] = []
        n = 0
        while n < CHUNK:
            if self._it is not None:
                try:
                    item = next(self._it, _END)
                except Exception as exc:
                    self._failed = exc
                    break
                if item is _END:
                    break
            else:
                try:  # the first item of a chunk is waited for; the others are taken as far as they have come
                    item = self._items.receive_nowait() if n else await self._items.receive()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
            n += 1
            if type(item) is Line:
                lineno, item = item.line, item.value
            elif type(item) is BadLine:
                self._bad(None, item.line, item.code, item.reason)
                continue
            else:
                lineno = self.lines + n
            if isinstance(item, BatchRequest):
                item = {"custom_id": item.custom_id, "url": item.url, "body": item.body, "method": item.method}
            cid, url, body, problem = check_request(item)
            if problem is not None:
                self._bad(cid, lineno, "bad_input", problem)
            else:
                pending.append((cid, url, body, lineno))  # type: ignore[arg-type]
        self.lines += n
        if n:
            return self._finish(pending)
        if self._failed is not None:
            raise self._failed
        return None

    def _bad(self, custom_id: Any, line: int, code: str, reason: str) -> None:
        self._requests.stats.view(self._stage, "").failed += 1
        if isinstance(custom_id, str) and custom_id and code == "bad_input":
            self._claims.append((custom_id, line))  # its result is out: a later line may not use the id again
        self._sink.bad(custom_id, line, ErrorOut(code=code, message=f"{self._name}:{line}: {reason}", line=line))

    def _finish(self, pending: list[tuple[str, str, dict[str, Any], int]]) -> list[WorkItem]:
        """Checked lines -> work items; a repeated custom_id is an error (the first line with an id owns it,
        a bad line included)."""
        order = sorted([(line, cid, i) for i, (cid, _, _, line) in enumerate(pending)] +
                       [(line, cid, -1) for cid, line in self._claims])
        self._claims.clear()
        found = self._dedup.check([(cid, line) for line, cid, _ in order])
        repeats = {order[j][2]: first for j, first in found.items() if order[j][2] >= 0}
        items: list[WorkItem] = []
        for i, (cid, url, body, line) in enumerate(pending):
            first = repeats.get(i)
            if first is not None:
                self._bad(cid, line, "duplicate_custom_id", f"custom_id {cid!r} already used on line {first}; "
                          "this line was not sent")
                continue
            try:
                data = canonical(body)
            except TypeError as exc:
                self._bad(cid, line, "bad_input", f"body cannot be encoded as JSON ({exc})")
                continue
            items.append(WorkItem(cid, url, body, data, self._requests.endpoint(url).key(url, data), line))
        # Two lines with the same chat body are two samples, as in the provider's Batch API: the k-th repeat of a
        # body (counted over the whole input, so a rerun counts the same) is sample k, its own key and answer.
        # Embeddings are deterministic: repeats share one answer.
        chat = [it for it in items if it.path == CHAT]
        for it, k in zip(chat, self._dedup.occurrences([it.key for it in chat])):
            if k:
                it.key = self._requests.chat_ep.key(CHAT, it.data, k)
        return items

    def close(self) -> None:
        self.stop()
        self._dedup.close()


def _decode_request(raw: bytes) -> Any:
    """One input line: a Batch request through msgspec (the common case, fast), anything else as plain JSON
    (check_request then says what is wrong with it)."""
    try:
        return _decode_line(raw)
    except msgspec.DecodeError:  # a ValidationError too
        return orjson.loads(raw)


class FileSource(Source):
    """Batch-format lines from a JSONL file, read lazily (io.iter_jsonl: blank lines skipped, lines numbered from
    1, a UTF-8 byte-order mark at the start ignored)."""

    def __init__(self, requests: Requests, path: str | os.PathLike[str], sink: Any,
                 max_line_bytes: int = MAX_LINE_BYTES, stage: str = "generate") -> None:
        super().__init__(requests, iter_jsonl(path, max_line_bytes, _decode_request), sink, str(path), stage)

    def close(self) -> None:
        super().close()
        self._it.close()  # type: ignore[union-attr]  # the reading generator: closes the file


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class Run:
    """One pass over a source with a fixed pool of workers. See the module docstring."""

    def __init__(self, requests: Requests, embedding_entry: EmbedEntry, source: Any, sink: Any, *,
                 stage: str = "generate", workers: int | None = None) -> None:
        self.requests = requests
        self._embedding_entry = embedding_entry
        self.source = source
        self.sink = sink
        self.stage = stage
        self.workers = max(1, workers or requests.config.concurrency)
        self.stopped: str | None = None  # RunStopped message
        self.failure: Exception | None = None  # what ended the source, raised by `run` at the end
        self.draining = False
        self.in_flight = 0
        self._queue: deque[WorkItem] = deque()
        self._high = max(2 * self.workers, CHUNK)
        self._feeding = True
        self._work_ready: anyio.Event | None = None  # set when the queue gets items or feeding ends
        self._need_more: anyio.Event | None = None  # set when the queue runs low
        self._scope: anyio.CancelScope | None = None

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self.source.pump)
                tg.start_soon(self._feed)
                for _ in range(self.workers):
                    tg.start_soon(self._work)
        except BaseExceptionGroup as group:
            raise primary(group) from None  # the error itself, not the group it came out of
        finally:
            self.source.close()
        if self.failure is not None:
            raise self.failure

    def drain(self) -> None:
        """Take no new requests; requests in flight finish (their results are written)."""
        self.draining = True
        self._queue.clear()
        self.source.stop()  # a feeder waiting for an async source's next item gets none
        self._wake_workers()
        self._wake_feeder()

    def abandon(self) -> None:
        """Cancel everything now, the requests on the wire included (their answers are lost: a rerun sends them).
        To let those finish and be cached, `drain()` and wait instead."""
        self.drain()
        if self._scope is not None:
            self._scope.cancel()

    def _wake_workers(self) -> None:
        if self._work_ready is not None:
            self._work_ready.set()
            self._work_ready = None

    def _wake_feeder(self) -> None:
        if self._need_more is not None:
            self._need_more.set()
            self._need_more = None

    async def _feed(self) -> None:
        cache = self.requests.cache
        stats = self.requests.stats
        try:
            while not self.draining:
                while len(self._queue) >= self._high and not self.draining:
                    self._need_more = anyio.Event()
                    await self._need_more.wait()
                if self.draining:
                    break
                chunk = await self.source.next_chunk()
                if chunk is None or self.draining:  # drained while an async source was read: nothing more goes
                    break
                hits = cache.get_many([it.key for it in chunk]) if (cache is not None and chunk) else {}
                for it in chunk:
                    hit = hits.get(it.key)
                    if hit is None:
                        self._queue.append(it)
                        continue
                    model = str(it.body.get("model") or "")
                    c = stats.view(self.stage, model)
                    c.ok += 1
                    c.cached += 1
                    if it.path == CHAT:  # what the replayed answer cost when it was paid for, as Engine.chat counts
                        self.requests.replayed(it.key, hit[0], model, self.stage, hit[1])
                    self.sink.ok(it, Answer(hit[0], None, hit[1], True))
                if self._queue:
                    self._wake_workers()
                await self.sink.wait_space()
                # Let workers and answers in: a fully cached rerun must not hold the loop for the whole file.
                await anyio.lowlevel.checkpoint()
        except Exception as exc:
            # The source failed (a producer's exception, an unreadable file): it ends here, as at the end of its
            # input. What it made before is sent and written, then `run` raises the failure.
            self.failure = exc
        finally:
            self._feeding = False
            self.source.stop()
            self._wake_workers()

    async def _send(self, item: WorkItem) -> Answer:
        if item.path == CHAT:
            # The feeder looked the key up already. A worker sends its line itself: it is cancelled only when the
            # run is abandoned, and a caller sharing the request then sends it (request.py).
            return await self.requests.call(CHAT, item.body, item.data, item.key, stage=self.stage,
                                            check_cache=False, inline=True)
        result = await self._embedding_entry(item.body, item.key, self.stage)
        self.requests.stats.view(self.stage, str(item.body.get("model") or "")).ok += 1
        body = result.body()
        return Answer(orjson.dumps(body), body, "", False)

    async def _work(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if not self._feeding or self.draining:
                    return
                self._wake_feeder()
                if self._work_ready is None:
                    self._work_ready = anyio.Event()
                await self._work_ready.wait()
                continue
            item = queue.popleft()
            if len(queue) < self.workers:
                self._wake_feeder()
            self.in_flight += 1
            try:
                answer = await self._send(item)
            except RequestFailed as exc:
                if item.path != CHAT:
                    self.requests.stats.view(self.stage, str(item.body.get("model") or "")).failed += 1
                self.sink.fail(item, exc.error)
            except RunStopped as exc:
                if self.stopped is None:
                    self.stopped = exc.message
                self.drain()
                return
            except NotSent:
                pass  # halted before it went out: no result, a rerun sends it
            else:
                self.sink.ok(item, answer)
            finally:
                self.in_flight -= 1
            if self.sink.full:
                await self.sink.wait_space()
