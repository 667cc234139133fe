"""The Batch API mode: requests answered by the provider's Batch API (OpenAI: half price, within 24 h), put into
the same cache the online path reads, so that whatever reads the cache afterwards (generate's results pass, a
pipeline stage calling `engine.chat`) finds every answer as if it had come online.

    outcome = await run_batches(engine, items, Path("run/batches/respond"), BatchSettings(), stage="respond")
    # every item's key is now in engine.cache, or in outcome.failures (never send those online)

API
- `BatchItem(key, url, body)`: one request. `key` must be the key the online path uses for it (`engine.key(body,
  url, sample)`; `chat_json_item` for what `chat_json` sends first), so its answer lands where `engine.chat(...)`
  and `generate` look it up. A key given twice is sent once.
- `run_batches(engine, items, state_dir, settings, *, stage, on_progress) -> BatchOutcome`. `BatchRun` is the
  same as an object, with `cut()` for a second Ctrl-C. `items` may be sync or async iterable; it is read once,
  lazily, and nothing is kept per item in memory but the keys of batches reattached from an earlier run.
- `BatchOutcome`: what happened, and `failures: {key: ErrorOut}` for the items that have no answer: permanent
  (400-class) failures, persisted in the state directory (a rerun knows them and never sends them), and lines
  still failing after `max_resubmits` resubmissions (this run only: a rerun tries them again).
- `on_progress(BatchProgress)`: after every status check of a batch, and when it is settled.
- `BatchReplay(engine, outcome.failures)`: a StageEngine for the pass that follows (a pipeline stage run as
  online over the cache): a request that failed in the batches raises its RequestFailed instead of going online.
- `read_state(state_dir)`: the batches a state directory records; `BatchAPI`: the provider's Files and Batches
  endpoints over an engine Transport (both for `tcia-async batches`).

What a call does
1. Reads the state directory (`batches.jsonl`, `failures.jsonl`, the input files of live batches), reattaches to
   every batch an earlier run left in flight, and finds (in the provider's batch list, by input file id) or
   creates the batch of a file uploaded just before a kill.
2. Streams `items`: skips keys in the cache, recorded permanent failures and keys held by a live batch; writes
   the rest into batch files in `state_dir`, one per (url, model) at a time (providers take one model a file),
   closed at `max_requests` lines, `max_bytes` bytes or the model's enqueued-token budget (prompt tokens,
   tokens.py). custom_id = the key in hex, so answers are matched by key and rows never misalign.
3. Each file is uploaded (purpose "batch") and its batch created once the model's budget has room among our
   batches in progress; a batch the provider refuses for its enqueued-token limit waits for room and is
   created again. Upload and batch ids are appended to `state_dir/batches.jsonl` (fsynced) as they are known.
4. Each batch is checked after growing waits (immediately, then `poll_interval` x 1.5 each time, up to
   `poll_max`). When it ends, its output and error files are downloaded to disk and read line by line: every
   answer goes into the cache (the output file stays in `state_dir` until the next call, which puts its answers
   into the cache again: a kill before the cache wrote them loses nothing), permanent failures into
   `state_dir/failures.jsonl`, and only the lines that failed transiently (5xx), expired or were cancelled go
   into a new batch (`round` + 1), up to `max_resubmits` times.
5. Returns when every batch has settled.

Guarantees
- A kill -9 at any moment loses no batch: ids are fsynced as they are known, and a batch created but not yet
  recorded is found again by its input file id. A key held by a live batch is never uploaded again.
- Quota and auth errors, and a Batch API failing transiently `max_attempts` times in a row, raise `RunStopped`
  (the engine's online path stops too); the state is kept and a rerun continues.
- Cancelling the call stops checking and uploading at once; batches stay at the provider and a rerun collects
  them. Only a batch create already sent is waited for, so that its id is recorded (`cut()` abandons it too).
- Answers count in the engine's stats under `stage` and their model, at `discount` x the configured prices, with
  the `batch_*` counters (errors.Counters).

One process per state directory (`state_dir/lock`).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import msgspec
import orjson

from tcia_async.config import BatchSettings, EngineConfig
from tcia_async.engine.client import TRANSPORT_ERRORS, BodyTooLarge, Transport, provider_of
from tcia_async.engine.cache import FileLock
from tcia_async.engine.errors import RequestFailed, RunStopped
from tcia_async.engine.request import BATCH_ID, CHAT, EMBEDDINGS, canonical, unsupported_url, usable
from tcia_async.engine.retry import FAIL, RETRY, STOP, Verdict, backoff, classify_status, invalid_body_verdict
from tcia_async.engine.runner import CHUNK, Dedup
from tcia_async.engine.core import ask_json, json_body
from tcia_async.engine.tokens import count_chat_prompt, count_embedding_input
from tcia_async.records import ErrorOut

T = TypeVar("T")

STATE_FILE = "batches.jsonl"
FAILURES_FILE = "failures.jsonl"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_ID_AT = slice(14, 46)  # the key's hex in a line we wrote: b'{"custom_id":"<32 hex>",...'


class BatchItem(NamedTuple):
    key: bytes  # the online path's cache key of this request
    url: str  # "/v1/chat/completions" or "/v1/embeddings"
    body: dict[str, Any]


def chat_json_item(engine: Any, body: dict[str, Any], typ: type[T], *, schema_name: str | None = None,
                   sample: int = 0) -> BatchItem:
    """The BatchItem of the first request `engine.chat_json(body, typ, ...)` sends (with `typ`'s schema); its
    answer in the cache is what chat_json then decodes. Corrections of an answer that does not match go online."""
    full = json_body(body, typ, schema_name)
    return BatchItem(engine.key(full, CHAT, sample), CHAT, full)


class BatchReplay:
    """A StageEngine over `engine` for the pass that follows `run_batches`: every answer comes from the cache, and a
    request the batches could not answer (its key in `failures`) raises its RequestFailed, counted as failed in
    the stats, instead of being sent online. Anything else (a chat_json correction, an embedding) goes through
    `engine` as usual."""

    def __init__(self, engine: Any, failures: dict[bytes, ErrorOut]) -> None:
        self.engine = engine
        self.failures = failures

    def check(self, key: bytes, model: Any, stage: str) -> None:
        """RequestFailed (counted as failed) when the batches could not answer `key`."""
        error = self.failures.get(key)
        if error is not None:
            self.engine.stats.view(stage, str(model or "")).failed += 1
            raise RequestFailed(error)

    async def chat(self, body: dict[str, Any], sample: int = 0, *, stage: str = "", priority: int = 0
                   ) -> dict[str, Any]:
        self.check(self.engine.key(body, CHAT, sample), body.get("model"), stage)
        return await self.engine.chat(body, sample, stage=stage, priority=priority)

    async def chat_json(self, body: dict[str, Any], typ: type[T], *, schema_name: str | None = None,
                        sample: int = 0, stage: str = "", priority: int = 0,
                        check: Callable[[T], str | None] | None = None) -> T:
        return await ask_json(self.chat, self.engine.config.schema_attempts, body, typ, schema_name=schema_name,
                              sample=sample, stage=stage, priority=priority, check=check)

    async def embed(self, texts: Any, model: str, *, dimensions: int | None = None, stage: str = "",
                    priority: int = 0) -> Any:
        return await self.engine.embed(texts, model, dimensions=dimensions, stage=stage, priority=priority)


class BatchRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One batch file as the state directory records it: its upload, its batch (once created) and its end."""

    name: str  # b000001: the local input file is NAME.jsonl
    url: str
    model: str
    base_url: str
    lines: int
    bytes: int
    tokens: int  # estimated prompt tokens (0 when no enqueued-token budget applies)
    round: int = 0  # 0: first submission; n: the n-th resubmission of failed lines
    parent: str | None = None  # the batch whose failed lines this one resubmits
    file_id: str | None = None
    batch_id: str | None = None
    uploaded_at: float = 0.0
    status: str = ""  # the last status recorded ("" before the batch is created)
    counts: dict[str, int] = {}
    settled: bool = False  # answers cached, failures recorded, failed lines resubmitted

    @property
    def live(self) -> bool:
        return not self.settled


class BatchProgress(msgspec.Struct, kw_only=True):
    name: str
    batch_id: str
    status: str
    model: str
    round: int
    total: int
    completed: int
    failed: int
    elapsed: float  # seconds since the provider created the batch


class BatchOutcome(msgspec.Struct, kw_only=True):
    """What one call did. `failures` holds every item without an answer (see the module docstring)."""

    items: int = 0  # distinct keys given
    cached: int = 0  # already in the cache
    held: int = 0  # already in a batch of an earlier run (collected by this call)
    uploads: int = 0  # files uploaded by this call
    batches: int = 0  # batches created by this call
    reattached: int = 0  # batches of an earlier run this call followed
    sent: int = 0  # lines uploaded by this call (resubmissions included)
    answered: int = 0  # lines answered by the batches this call settled
    resubmitted: int = 0  # lines sent again after a transient failure, an expiry or a cancellation
    failures: dict[bytes, ErrorOut] = {}


# ----------------------------------------------------------------------------------------------------------------
# The state directory
# ----------------------------------------------------------------------------------------------------------------


def _events(path: Path) -> Iterable[dict[str, Any]]:
    """The events of an append-only JSONL file; a line cut short by a kill is skipped."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(ev, dict):
                yield ev


def read_state(state_dir: str | os.PathLike[str]) -> list[BatchRecord]:
    """Every batch file `state_dir` records, oldest first, with what is known of it. Reads only."""
    records: dict[str, BatchRecord] = {}
    for ev in _events(Path(state_dir) / STATE_FILE):
        kind = ev.pop("event", None)
        name = ev.get("name")
        if kind == "upload":
            try:
                records[name] = msgspec.convert(ev, BatchRecord)
            except msgspec.ValidationError:
                continue
            continue
        rec = records.get(name)  # type: ignore[arg-type]
        if rec is None:
            continue
        if kind == "batch":
            rec.batch_id, rec.status = ev.get("batch_id"), "created"
        elif kind == "refused":
            rec.batch_id, rec.status = None, "refused"
        elif kind == "settled":
            rec.settled, rec.status, rec.counts = True, ev.get("status", ""), ev.get("counts") or {}
    return list(records.values())


class _Log:
    """An append-only JSONL file whose every line is on disk (fsynced) when `append` returns."""

    def __init__(self, path: Path) -> None:
        new = not path.exists()
        self._fh = open(path, "ab")
        if new:  # the file's own directory entry must survive a crash too
            _fsync_dir(path.parent)

    def append(self, obj: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(obj) + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StateBusy(Exception):
    """Another process is using the batch state directory."""


def _keys_of(path: Path) -> list[bytes]:
    """The keys of a batch input file we wrote, in line order."""
    with open(path, "rb") as fh:
        return [bytes.fromhex(line[_ID_AT].decode()) for line in fh if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# The provider's Files and Batches endpoints
# ----------------------------------------------------------------------------------------------------------------


class BatchRefused(Exception):
    """The provider answered a final error to a Batch API call (or any error, when the call is not retried);
    `code` is the provider's own error code (e.g. token_limit_exceeded), "" when it gave none."""

    def __init__(self, verdict: Verdict, raw: bytes) -> None:
        super().__init__(f"{verdict.status} {verdict.code}: {verdict.message}")
        self.verdict = verdict
        try:
            err = orjson.loads(raw).get("error")
            self.code = str(err.get("code") or "") if isinstance(err, dict) else ""
        except (orjson.JSONDecodeError, AttributeError):
            self.code = ""


class BatchAPI:
    """The Files and Batches endpoints of one base URL. Transient failures are retried with backoff, up to
    `max_attempts` in a row; then, and on quota or auth errors, `stop` raises RunStopped."""

    def __init__(self, transport: Transport, config: EngineConfig,
                 stop: Callable[[str], RunStopped] = RunStopped) -> None:
        self.transport = transport
        self.config = config
        self._stop = stop

    async def call(self, what: str, send: Callable[[], Any], *, retry: bool = True) -> bytes:
        """The body of a 200 answer to `send()` (one HTTP exchange). A final error raises `BatchRefused`; with
        `retry=False` a transient one does too (the caller decides whether the call may be repeated)."""
        cfg = self.config
        attempt = 0
        while True:
            attempt += 1
            try:
                status, headers, raw = await send()
            except TRANSPORT_ERRORS as exc:
                status, headers, raw = 0, {}, b""
                verdict = self.transport.verdict(exc)
            except BodyTooLarge as exc:
                raise self._stop(f"{what}: {exc}") from None
            else:
                if status == 200:
                    return raw
                verdict = classify_status(status, raw, headers)
            if verdict.kind == STOP:
                raise self._stop(f"{what}: {verdict.status} {verdict.code}: {verdict.message}")
            if verdict.kind == FAIL or not retry:
                raise BatchRefused(verdict, raw)
            if attempt >= cfg.max_attempts:
                raise self._stop(f"{what} failed {attempt} times in a row (last: {verdict.code}: {verdict.message})")
            wait = backoff(attempt, cfg.backoff_base, cfg.backoff_cap)
            await anyio.sleep(wait if verdict.wait is None else max(wait, min(verdict.wait, cfg.backoff_cap)))

    async def json(self, what: str, send: Callable[[], Any], *, retry: bool = True) -> dict[str, Any]:
        raw = await self.call(what, send, retry=retry)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise self._stop(f"{what}: the provider's answer is not a JSON object: {raw[:200]!r}")
        return obj

    def url(self, path: str) -> str:
        return self.transport.url(path)

    async def upload(self, path: Path) -> dict[str, Any]:
        return await self.json(f"uploading {path.name}", lambda: self.transport.upload(
            self.url("/v1/files"), path, {"purpose": "batch"}))

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """A transient failure is `BatchRefused` too: the batch may exist, and only the caller can look."""
        data = orjson.dumps(body)
        return await self.json("creating a batch", lambda: self.transport.post(self.url("/v1/batches"), data),
                               retry=False)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        return await self.json(f"checking batch {batch_id}",
                               lambda: self.transport.get(self.url(f"/v1/batches/{batch_id}")))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self.json(f"cancelling batch {batch_id}",
                               lambda: self.transport.post(self.url(f"/v1/batches/{batch_id}/cancel"), b"{}"))

    async def download(self, file_id: str, dest: Path) -> None:
        await self.call(f"downloading file {file_id}",
                        lambda: self.transport.download(self.url(f"/v1/files/{file_id}/content"), dest))

    async def delete_file(self, file_id: str) -> None:
        """Best effort: a file left behind costs storage, not money, and must not fail a finished batch."""
        try:
            await self.call(f"deleting file {file_id}",
                            lambda: self.transport.delete(self.url(f"/v1/files/{file_id}")), retry=False)
        except BatchRefused:
            pass

    async def find(self, file_ids: set[str], since: float, pages: int = 20) -> dict[str, dict[str, Any]]:
        """{input file id: batch} for the batches in the provider's list made from `file_ids`, looking back to
        `since` (epoch seconds; the list is newest first)."""
        found: dict[str, dict[str, Any]] = {}
        after: str | None = None
        for _ in range(pages):
            query = "?limit=100" + (f"&after={after}" if after else "")
            page = await self.json("listing batches", lambda q=query: self.transport.get(self.url("/v1/batches" + q)))
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for b in data:
                fid = b.get("input_file_id")
                if fid in file_ids and fid not in found:
                    found[fid] = b
            if not data or not page.get("has_more") or len(found) == len(file_ids):
                break
            if all((b.get("created_at") or 0) < since for b in data):
                break
            after = data[-1].get("id")
        return found


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class _Writer:
    """A batch input file being written."""

    def __init__(self, path: Path, url: str, model: str) -> None:
        self.path = path
        self.url = url
        self.model = model
        self.fh = open(path, "wb")
        self.lines = 0
        self.bytes = 0
        self.tokens = 0

    def add(self, line: bytes, tokens: int) -> None:
        self.fh.write(line)
        self.lines += 1
        self.bytes += len(line)
        self.tokens += tokens

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def _line(key: bytes, url: str, data: bytes) -> bytes:
    return b'{"custom_id":"%s","method":"POST","url":"%s","body":%s}\n' % (key.hex().encode(), url.encode(), data)


async def _chunks(items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> AsyncIterator[list[BatchItem]]:
    """Lists of up to CHUNK items (one cache lookup each), from a sync or an async iterable."""
    if not hasattr(items, "__aiter__"):
        it = iter(items)  # type: ignore[arg-type]
        while chunk := list(itertools.islice(it, CHUNK)):
            yield chunk
        return
    chunk: list[BatchItem] = []
    async for item in items:  # type: ignore[union-attr]
        chunk.append(item)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BatchRun:
    """One pass of the Batch API mode over a set of requests; see the module docstring."""

    def __init__(self, engine: Any, state_dir: str | os.PathLike[str], settings: BatchSettings, *,
                 stage: str = "", on_progress: Callable[[BatchProgress], None] | None = None) -> None:
        if engine.cache is None:
            raise ValueError("the Batch API mode needs the engine's cache (its answers go there)")
        self.engine = engine
        self.requests = engine.requests
        self.requests.batch_discount = settings.discount  # replays of batch answers cost this share
        self.cache = engine.cache
        self.dir = Path(state_dir)
        self.settings = settings
        self.stage = stage
        self.on_progress = on_progress
        self.outcome = BatchOutcome()
        self._records: dict[str, BatchRecord] = {}
        self._failures: dict[bytes, ErrorOut] = {}  # persisted permanent failures
        self._live: set[bytes] = set()  # keys held by the live batches of an earlier run
        self._enqueued: dict[str, int] = {}  # estimated prompt tokens of our batches in progress, per model
        self._released = anyio.Event()  # set (and replaced) whenever a batch of ours ends
        self._apis: dict[str, BatchAPI] = {}
        self._next = 1
        self._log: _Log | None = None
        self._fail_log: _Log | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._fatal: BaseException | None = None
        self._shields: set[anyio.CancelScope] = set()
        self._uploading = anyio.CapacityLimiter(2)  # big files: a couple at a time share the link better

    # -- control ----------------------------------------------------------------------------------------------

    def cut(self) -> None:
        """Abandon a batch create on the wire too (a second Ctrl-C); a rerun finds that batch by its file."""
        for scope in list(self._shields):
            scope.cancel()

    async def run(self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> BatchOutcome:
        if self.requests.stopped is not None:
            raise RunStopped(self.requests.stopped)
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.dir / "lock")
        lock.take(lambda _holder: StateBusy(f"{self.dir}: another process is using this batch state directory; "
                                            "wait for it to finish"))
        try:
            live = self._open_state()
            self._log = _Log(self.dir / STATE_FILE)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                unbatched = [r for r in live if r.batch_id is None]
                for rec in live:
                    if rec.batch_id is not None:
                        self.outcome.reattached += 1
                        self._hold(rec)
                        tg.start_soon(self._guard, self._lifecycle, rec)
                if unbatched:
                    tg.start_soon(self._guard, self._recover, unbatched)
                tg.start_soon(self._guard, self._build, items)
        finally:
            self._tg = None
            for log in (self._log, self._fail_log):
                if log is not None:
                    log.close()
            lock.release()
        if self._fatal is not None:
            raise self._fatal
        return self.outcome

    async def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run one task of the group; its failure is the run's (the first one wins) and ends the others."""
        try:
            await fn(*args)
        except Exception as exc:
            if self._fatal is None:
                self._fatal = exc
            assert self._tg is not None
            self._tg.cancel_scope.cancel()

    def _stop(self, why: str) -> RunStopped:
        message = self.requests.scrub(f"the provider's Batch API refused the run: {why}")
        if self.requests.stopped is None:
            self.requests.stopped = message  # the online path stops too, as after a quota error there
        return RunStopped(message)

    def _api(self, url: str) -> BatchAPI:
        transport = self.requests.endpoint(url).transport
        api = self._apis.get(transport.provider)
        if api is None:
            api = self._apis[transport.provider] = BatchAPI(transport, self.requests.config, self._stop)
        return api

    def _report(self, rec: BatchRecord, obj: dict[str, Any]) -> None:
        if self.on_progress is None:
            return
        counts = obj.get("request_counts") or {}
        created = obj.get("created_at")
        self.on_progress(BatchProgress(
            name=rec.name, batch_id=rec.batch_id or "", status=str(obj.get("status") or ""), model=rec.model,
            round=rec.round, total=int(counts.get("total") or rec.lines), completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            elapsed=max(0.0, time.time() - created) if isinstance(created, (int, float)) else 0.0))

    # -- state --------------------------------------------------------------------------------------------------

    def _open_state(self) -> list[BatchRecord]:
        """Read the records; delete files no live record needs (inputs written but never uploaded, downloads
        of a settle cut short); load the keys of live batches and the recorded failures. The live records of
        this provider, oldest first."""
        self._records = {r.name: r for r in read_state(self.dir)}
        providers = {self.requests.endpoint(u).provider for u in (CHAT, EMBEDDINGS)}
        live = [r for r in self._records.values() if r.live and provider_of(r.base_url) in providers]
        keep = {f"{r.name}.jsonl" for r in self._records.values() if r.live}
        numbers = [int(r.name[1:]) for r in self._records.values() if r.name[1:].isdigit()]
        for f in sorted(self.dir.glob("b*.jsonl")):
            stem = f.name.split(".")[0]
            if not stem[1:].isdigit():
                continue  # batches.jsonl itself
            numbers.append(int(stem[1:]))
            rec = self._records.get(stem)
            if f.name.endswith(".output.jsonl") and rec is not None and rec.settled:
                self._replay(f, rec)
            if f.name not in keep:
                f.unlink(missing_ok=True)
        self._next = max(numbers, default=0) + 1
        for rec in live:
            path = self._input(rec)
            if path.exists():
                self._live.update(_keys_of(path))
        for ev in _events(self.dir / FAILURES_FILE):
            try:
                self._failures[bytes.fromhex(ev["key"])] = msgspec.convert(ev["error"], ErrorOut)
            except (KeyError, ValueError, TypeError, msgspec.ValidationError):
                continue
        return live

    def _replay(self, path: Path, rec: BatchRecord) -> None:
        """Put the answers of a settled batch's output file into the cache again (the cache keeps the first copy
        of a key): those the cache had not written yet when a kill came are not lost, nor paid for again."""
        with open(path, "rb") as fh:
            for raw in fh:
                line, key = _parse_line(raw)
                if key is not None:
                    _put_answer(self.cache, key, line.get("response"), rec.url)

    def _input(self, rec: BatchRecord) -> Path:
        return self.dir / f"{rec.name}.jsonl"

    def _append(self, event: str, rec: BatchRecord, **fields: Any) -> None:
        assert self._log is not None
        self._log.append({"event": event, "name": rec.name, "at": round(time.time(), 3), **fields})

    def _new_writer(self, url: str, model: str) -> _Writer:
        name = f"b{self._next:06d}"
        self._next += 1
        return _Writer(self.dir / f"{name}.jsonl", url, model)

    # -- building batch files ----------------------------------------------------------------------------------

    async def _build(self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> None:
        out = self.outcome
        seen = Dedup()
        writers: dict[tuple[str, str], _Writer] = {}
        try:
            async for chunk in _chunks(items):
                keys = [it.key for it in chunk]
                hits = self.cache.get_many(keys)
                for it, before in zip(chunk, seen.occurrences(keys)):
                    if before:
                        continue
                    out.items += 1
                    if it.key in hits:
                        out.cached += 1
                    elif it.key in self._failures:
                        out.failures[it.key] = self._failures[it.key]
                    elif it.key in self._live:
                        out.held += 1
                    else:
                        self._add(writers, it)
                await anyio.lowlevel.checkpoint()
            for gk in list(writers):
                self._ship(writers.pop(gk))
        finally:
            seen.close()
            for w in writers.values():  # cut short: an unshipped file is deleted by the next run
                w.fh.close()

    def _add(self, writers: dict[tuple[str, str], _Writer], it: BatchItem) -> None:
        s = self.settings
        why = unsupported_url(it.url)
        if why:
            self.outcome.failures[it.key] = ErrorOut(code="bad_input", message=why)
            return
        model = str(it.body.get("model") or "")
        line = _line(it.key, it.url, canonical(it.body))
        budget = s.token_budget(model)
        tokens = 0
        if budget is not None:  # counting costs a few microseconds a line: only where a budget needs it
            body = it.body
            tokens = count_chat_prompt(body) if it.url == CHAT else count_embedding_input(body.get("input"))
        if len(line) > s.max_bytes or (budget is not None and tokens > budget):
            why = (f"{len(line)} bytes, over a batch file's max_bytes ({s.max_bytes})" if len(line) > s.max_bytes
                   else f"about {tokens} prompt tokens, over {model}'s enqueued-token budget ({budget})")
            self.outcome.failures[it.key] = ErrorOut(code="request_too_large", message=f"this request is {why}",
                                                     attempts=0)
            return
        gk = (it.url, model)
        w = writers.get(gk)
        if w is not None and (w.lines >= s.max_requests or w.bytes + len(line) > s.max_bytes
                              or (budget is not None and w.tokens + tokens > budget)):
            self._ship(writers.pop(gk))
            w = None
        if w is None:
            w = writers[gk] = self._new_writer(it.url, model)
        w.add(line, tokens)

    def _ship(self, w: _Writer, *, round: int = 0, parent: str | None = None) -> None:
        """A finished file: upload it and follow its batch, in a task of the run's group."""
        w.close()
        api = self._api(w.url)
        rec = BatchRecord(name=w.path.stem, url=w.url, model=w.model, base_url=api.transport.base_url,
                          lines=w.lines, bytes=w.bytes, tokens=w.tokens, round=round, parent=parent)
        assert self._tg is not None
        self._tg.start_soon(self._guard, self._submit, rec)

    # -- one batch's life ---------------------------------------------------------------------------------------

    async def _submit(self, rec: BatchRecord) -> None:
        api = self._api(rec.url)
        async with self._uploading:
            obj = await api.upload(self._input(rec))
        rec.file_id = str(obj.get("id") or "")
        rec.uploaded_at = time.time()
        self._records[rec.name] = rec
        assert self._log is not None
        self._log.append({"event": "upload", **msgspec.to_builtins(rec)})
        self.outcome.uploads += 1
        self.outcome.sent += rec.lines
        self.engine.stats.view(self.stage, rec.model).batch_sent += rec.lines
        await self._lifecycle(rec)

    async def _recover(self, unbatched: list[BatchRecord]) -> None:
        """Files uploaded by an earlier run whose batch id was not recorded: the batch may exist (a kill between
        its create and the record); adopt it if the provider lists one made from the file, else create it."""
        by_url: dict[str, list[BatchRecord]] = {}
        for rec in unbatched:
            by_url.setdefault(rec.url, []).append(rec)
        for url, recs in by_url.items():
            since = min(r.uploaded_at for r in recs) - 3600  # clocks differ; an hour of slack costs a page
            found = await self._api(url).find({r.file_id for r in recs if r.file_id}, since)
            for rec in recs:
                b = found.get(rec.file_id or "")
                if b is not None:
                    rec.batch_id = str(b["id"])
                    self._append("batch", rec, batch_id=rec.batch_id, adopted=True)
                    self.outcome.reattached += 1
                    self._hold(rec)
                assert self._tg is not None
                self._tg.start_soon(self._guard, self._lifecycle, rec)

    def _hold(self, rec: BatchRecord) -> None:
        """Count a batch in progress against its model's enqueued tokens."""
        self._enqueued[rec.model] = self._enqueued.get(rec.model, 0) + rec.tokens

    def _release(self, rec: BatchRecord) -> None:
        self._enqueued[rec.model] = max(0, self._enqueued.get(rec.model, 0) - rec.tokens)
        self._released.set()
        self._released = anyio.Event()

    async def _room(self, rec: BatchRecord) -> None:
        """Wait until the model's budget has room for this batch among ours in progress, and take it."""
        budget = self.settings.token_budget(rec.model)
        if budget is not None:
            while self._enqueued.get(rec.model, 0) > 0 and self._enqueued[rec.model] + rec.tokens > budget:
                await self._released.wait()
        self._hold(rec)

    async def _until_room(self, rec: BatchRecord, wait: float) -> None:
        """After the provider refused a batch for its enqueued tokens: wait for one of ours of the model to end,
        or, with none of ours in progress (others' batches fill the budget), `wait` seconds."""
        if self._enqueued.get(rec.model, 0) > 0:
            await self._released.wait()
        else:
            await anyio.sleep(wait)

    async def _lifecycle(self, rec: BatchRecord) -> None:
        s = self.settings
        refusal_wait = s.poll_interval
        while True:
            if rec.batch_id is None and not await self._create(rec):
                return
            obj = await self._follow(rec)
            if obj.get("status") == "failed" and "token_limit_exceeded" in _error_codes(obj):
                self._append("refused", rec, batch_id=rec.batch_id, code="token_limit_exceeded")
                rec.batch_id = None
                await self._until_room(rec, refusal_wait)
                refusal_wait = min(s.poll_max, refusal_wait * 1.5)
                continue
            await self._settle(rec, obj)
            return

    async def _create(self, rec: BatchRecord) -> bool:
        """Create the batch of an uploaded file once its model has room, and record its id. False when `cut()`
        abandoned the create on the wire (a rerun finds that batch by its file)."""
        s = self.settings
        api = self._api(rec.url)
        body = {"input_file_id": rec.file_id, "endpoint": rec.url, "completion_window": s.completion_window,
                "metadata": {"tcia_async": rec.name}}
        wait = s.poll_interval
        transient = 0
        while True:
            await self._room(rec)
            full = False
            # Once sent, a create may have made a batch: see it through and record its id, whoever cancels.
            with anyio.CancelScope(shield=True) as shield:
                self._shields.add(shield)
                try:
                    try:
                        obj = await api.create(body)
                    except BatchRefused as exc:
                        obj = None
                        if exc.code == "token_limit_exceeded":
                            full = True
                        elif exc.verdict.kind == FAIL:
                            raise self._stop(f"creating the batch of {rec.name}: {exc}") from None
                        else:  # transient: the batch may exist all the same; look before making another
                            transient += 1
                            if transient >= self.requests.config.max_attempts:
                                raise self._stop(f"creating the batch of {rec.name} failed {transient} times in a "
                                                 f"row (last: {exc})") from None
                            obj = (await api.find({rec.file_id or ""}, rec.uploaded_at - 3600)).get(rec.file_id or "")
                    if obj is not None:
                        rec.batch_id = str(obj["id"])
                        self._append("batch", rec, batch_id=rec.batch_id)
                        self.outcome.batches += 1
                        return True
                finally:
                    self._shields.discard(shield)
            if shield.cancel_called:
                return False
            self._release(rec)
            if full:  # refused for the enqueued-token limit: when room is likely
                await self._until_room(rec, wait)
                wait = min(s.poll_max, wait * 1.5)
            else:  # failed transiently and no batch was made: back off as for any request
                cfg = self.requests.config
                await anyio.sleep(backoff(transient, cfg.backoff_base, cfg.backoff_cap))

    async def _follow(self, rec: BatchRecord) -> dict[str, Any]:
        """The batch's object once it has ended; checked at once, then after growing waits."""
        s = self.settings
        api = self._api(rec.url)
        wait = s.poll_interval
        while True:
            obj = await api.batch(rec.batch_id or "")
            self._report(rec, obj)
            if obj.get("status") in TERMINAL:
                self._release(rec)
                return obj
            await anyio.sleep(wait)  # the provider has no push: a computed wait between checks
            wait = min(s.poll_max, wait * 1.5)

    # -- settling a batch that ended ----------------------------------------------------------------------------

    async def _settle(self, rec: BatchRecord, obj: dict[str, Any]) -> None:
        """Cache every answer, record permanent failures, resubmit the rest; then record the batch as settled."""
        api = self._api(rec.url)
        status = str(obj.get("status") or "")
        src = self._input(rec)
        order = _keys_of(src) if src.exists() else []
        mine = set(order) if order else None  # None: its input file is gone; take every answer it has
        retry: dict[bytes, ErrorOut] = {}
        final: dict[bytes, ErrorOut] = {}
        answered: set[bytes] = set()
        stop: str | None = None
        attempts = rec.round + 1
        if status == "failed":  # refused at validation: the errors name lines, or the whole file
            errors = _errors(obj)
            whole = ErrorOut(code="batch_failed", message="; ".join(
                str(e.get("message") or e.get("code")) for e in errors)[:500] or "the batch failed", attempts=attempts)
            named: dict[bytes, ErrorOut] = {}
            for e in errors:
                line = e.get("line")
                if isinstance(line, int) and 1 <= line <= len(order):
                    named[order[line - 1]] = ErrorOut(code=str(e.get("code") or "invalid_request"),
                                                      message=str(e.get("message") or ""), status=400,
                                                      attempts=attempts)
            final.update(named)
            for k in order:
                if k not in named:
                    retry[k] = whole
        for kind in ("output_file_id", "error_file_id"):
            fid = obj.get(kind)
            if not fid:
                continue
            dest = self.dir / f"{rec.name}.{kind.split('_')[0]}.jsonl"
            await api.download(str(fid), dest)
            n = 0
            with open(dest, "rb") as fh:
                for raw in fh:
                    verdict = self._take(rec, raw, mine, answered, retry, final, attempts)
                    if verdict is not None and stop is None:
                        stop = f"{verdict.status} {verdict.code}: {verdict.message}"
                    n += 1
                    if n % CHUNK == 0:
                        await anyio.lowlevel.checkpoint()  # let the cache flusher and other batches run
            if kind == "error_file_id":
                dest.unlink(missing_ok=True)  # its outcome is in failures.jsonl or in a resubmission
        for k in order:
            if k not in answered and k not in retry and k not in final:
                retry[k] = ErrorOut(code=f"batch_{status or 'ended'}",
                                    message=f"no answer: the batch {status or 'ended'} before this line ran",
                                    attempts=attempts)
        out = self.outcome
        out.answered += len(answered)
        if final:
            if self._fail_log is None:
                self._fail_log = _Log(self.dir / FAILURES_FILE)
            for k, err in final.items():
                self._fail_log.append({"key": k.hex(), "error": msgspec.to_builtins(err)})
            self._failures.update(final)
            out.failures.update(final)
        child = next((r for r in self._records.values() if r.parent == rec.name), None)
        if retry and child is None:  # a child exists when a kill came between resubmitting and this record
            if rec.round < self.settings.max_resubmits and src.exists():  # (its bodies are in its input file)
                w = self._new_writer(rec.url, rec.model)
                with open(src, "rb") as fh:
                    for raw in fh:
                        if raw.strip() and bytes.fromhex(raw[_ID_AT].decode()) in retry:
                            w.add(raw, 0)
                w.tokens = rec.tokens * w.lines // max(1, rec.lines)
                out.resubmitted += w.lines
                self._ship(w, round=rec.round + 1, parent=rec.name)
            else:
                out.failures.update(retry)
        counts = obj.get("request_counts") or {}
        rec.settled, rec.status = True, status
        self._append("settled", rec, batch_id=rec.batch_id, status=status, counts=counts)
        self._report(rec, obj)
        src.unlink(missing_ok=True)
        if self.settings.delete_files:
            for fid in (rec.file_id, obj.get("output_file_id"), obj.get("error_file_id")):
                if fid:
                    await api.delete_file(str(fid))
        if stop is not None:
            raise self._stop(f"batch {rec.batch_id}: {stop}")

    def _take(self, rec: BatchRecord, raw: bytes, mine: set[bytes] | None, answered: set[bytes],
              retry: dict[bytes, ErrorOut], final: dict[bytes, ErrorOut], attempts: int) -> Verdict | None:
        """Read one line of an output or error file; a STOP verdict (quota, auth) is returned."""
        line, key = _parse_line(raw)
        if key is None or (mine is not None and key not in mine) or key in answered:
            return None  # not a line of ours (or cut short): its request counts as unanswered
        resp = line.get("response")
        if _put_answer(self.cache, key, resp, rec.url):
            self._account(rec.model, resp["body"])
            self.requests.paid_by_batch.add(key)  # counted here: its replay from the cache is not a second cost
            answered.add(key)
            retry.pop(key, None)
            return None
        if isinstance(resp, dict) and isinstance(resp.get("status_code"), int):
            status = resp["status_code"]
            verdict = classify_status(status, orjson.dumps(resp.get("body")), {}) if status != 200 else \
                invalid_body_verdict(200, "answer without a usable choice")
        else:
            err = line.get("error") if isinstance(line.get("error"), dict) else {}
            verdict = Verdict(RETRY, str(err.get("code") or "batch_error"), str(err.get("message") or ""))
        error = ErrorOut(code=verdict.code, message=self.requests.scrub(verdict.message)[:500], status=verdict.status,
                         attempts=attempts)
        if verdict.kind == FAIL:
            final[key] = error
        else:
            retry[key] = error
        return verdict if verdict.kind == STOP else None

    def _account(self, model: str, body: dict[str, Any]) -> None:
        p, c, cached, cost, full = self.requests.usage(body, model)
        d = self.settings.discount
        v = self.engine.stats.view(self.stage, model)
        v.add_usage(p, c, cached, cost * d, full * d)
        v.batch_ok += 1
        v.batch_tokens += p + c
        v.batch_cost += cost * d
        v.batch_saved += cost * (1 - d)


def _parse_line(raw: bytes) -> tuple[dict[str, Any], bytes | None]:
    """(the line, its key) of an output or error file line; key None when it is not a line of ours."""
    try:
        line = orjson.loads(raw)
        return line, bytes.fromhex(line["custom_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}, None


def _put_answer(cache: Any, key: bytes, resp: Any, url: str) -> bool:
    """Cache a line's response when it is a usable answer (200, with choices or data); whether it was."""
    if not (isinstance(resp, dict) and resp.get("status_code") == 200 and usable(resp.get("body"), url == CHAT)):
        return False
    cache.put(key, orjson.dumps(resp["body"]), BATCH_ID + str(resp.get("request_id") or ""))
    return True


def _errors(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of a failed batch's `errors`."""
    errors = obj.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    return [e for e in data or [] if isinstance(e, dict)]


def _error_codes(obj: dict[str, Any]) -> set[str]:
    return {str(e.get("code")) for e in _errors(obj)}


async def run_batches(engine: Any, requests: Iterable[BatchItem] | AsyncIterable[BatchItem],
                      state_dir: str | os.PathLike[str], settings: BatchSettings, *, stage: str = "",
                      on_progress: Callable[[BatchProgress], None] | None = None) -> BatchOutcome:
    """Answer `requests` through the Batch API into the engine's cache; see the module docstring."""
    return await BatchRun(engine, state_dir, settings, stage=stage, on_progress=on_progress).run(requests)


__all__ = ["BatchAPI", "BatchItem", "BatchOutcome", "BatchProgress", "BatchRecord", "BatchRefused", "BatchReplay",
           "BatchRun", "StateBusy", "chat_json_item", "read_state", "run_batches", "FAILURES_FILE", "STATE_FILE",
           "TERMINAL"]
