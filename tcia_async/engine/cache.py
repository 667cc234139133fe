"""Content-addressed response cache: SQLite in WAL mode, one row per answered request. Resume lives here.

Identity (DESIGN.md): a request's key is a 16-byte BLAKE2b digest of the provider of its base URL (the host name),
its URL path, an explicit sample index and its canonical body (JSON with sorted keys). Nothing else goes in: no
API key, no header, no run fingerprint. Editing one input line changes one key.

Guarantees:
- `put` never blocks on disk: rows wait in memory, visible to `get`/`get_many` at once, and are written in
  batches, one transaction each, when `batch_rows` are waiting or `flush_interval` seconds after the first one.
- While `run_flusher` runs (the engine owns that task), a batch is written behind the event loop, on a worker
  thread with a connection of its own, as one multi-row INSERT: SQLite releases the GIL for the whole statement,
  so the B-tree and WAL work (and the checkpoints SQLite runs after a commit) stays off the loop. Without it,
  a full batch is written by `put` itself. `flush()` and `close()` write whatever waits, at once.
- A commit appends to the WAL and does not wait for the disk (synchronous=NORMAL: only checkpoints fsync). A
  committed batch survives the process being killed (kill -9) at any moment; a kill loses at most the rows not
  yet committed (fewer than four batches: the one being written, and up to two waiting) and never corrupts the
  file.
- A key is stored at most once per answer; should two rows ever hold one key, either answer is valid. Only
  successful (HTTP 200) answers are stored.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import anyio

# Rows are appended in rowid order and found through an index on the key's first 8 bytes: an append touches the
# last pages only, where a table clustered on a random key rewrites a page per row (4 KB of WAL per answer).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    h INTEGER NOT NULL,
    key BLOB NOT NULL,
    body BLOB NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_h ON responses(h);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_VERSION = "2"
_from_bytes = int.from_bytes
_blake2b = hashlib.blake2b


def _h(key: bytes) -> int:
    return _from_bytes(key[:8], "little", signed=True)


def key_prefix(provider: str, path: str) -> bytes:
    """The part of every key shared by all requests to one (provider, URL path); compute it once."""
    return f"{provider}\n{path}\n".encode()


def request_key(prefix: bytes, sample: int, canonical_body: bytes) -> bytes:
    """The cache key of one request. `canonical_body` is `orjson.dumps(body, option=OPT_SORT_KEYS)`."""
    return _blake2b(b"%s%d\n%s" % (prefix, sample, canonical_body), digest_size=16).digest()


class CacheError(Exception):
    pass


_COLUMNS = 5  # h, key, body, request_id, created


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class ResponseCache:
    """See the module docstring."""

    def __init__(self, path: str | os.PathLike[str], batch_rows: int = 512, flush_interval: float = 0.05) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The loop's connection: reads, and the writes made by `flush` and `put` themselves. The engine uses it
            # from one thread at a time (the event loop's, or a worker thread at close).
            self._db = _connect(self.path)
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE name='version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('version', ?)", (_VERSION,))
            elif row[0] != _VERSION:
                raise CacheError(f"{self.path}: cache format {row[0]}, this version reads {_VERSION}")
            # Rows per INSERT statement: SQLite caps the number of parameters of one statement (999 before 3.32).
            limit = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: not a usable cache database ({exc})") from None
        self._rows_per_insert = max(1, min(500, limit // _COLUMNS))
        self._insert_sql: dict[int, str] = {}
        self._pending: dict[bytes, tuple[bytes, str]] = {}  # waiting for the next batch
        self._writing: dict[bytes, tuple[bytes, str]] = {}  # handed to the writer thread, not yet committed
        self._batch_rows = max(1, batch_rows)
        self._most_waiting = self._batch_rows  # rows waiting that `put` writes itself (two batches with a flusher)
        self.flush_interval = flush_interval
        self._wake: anyio.Event | None = None  # set by `put` for the flusher: a first row, or a full batch
        self._write_lock = threading.Lock()  # one writer at a time: the flusher's thread, or flush() on the loop
        self._closed = False
        self.writes = 0  # rows committed

    # -- reads ----------------------------------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes, str] | None:
        """(body, request_id) stored for `key`, or None."""
        hit = self._pending.get(key) or self._writing.get(key)
        if hit is not None:
            return hit
        for k, body, rid in self._db.execute("SELECT key, body, request_id FROM responses WHERE h=?", (_h(key),)):
            if k == key:
                return body, rid
        return None

    def get_many(self, keys: list[bytes]) -> dict[bytes, tuple[bytes, str]]:
        """The stored answers among `keys` (one query per up to 500 keys)."""
        found: dict[bytes, tuple[bytes, str]] = {}
        pending = self._pending
        writing = self._writing
        ask = []
        for k in keys:
            hit = pending.get(k) or writing.get(k)
            if hit is not None:
                found[k] = hit
            else:
                ask.append(k)
        if not ask:
            return found
        wanted = set(ask)
        db = self._db
        for i in range(0, len(ask), 500):
            chunk = [_h(k) for k in ask[i:i + 500]]
            sql = "SELECT key, body, request_id FROM responses WHERE h IN (%s)" % ",".join("?" * len(chunk))
            for k, body, rid in db.execute(sql, chunk):
                if k in wanted:
                    found[k] = (body, rid)
        return found

    # -- writes ---------------------------------------------------------------------------------------------------

    def put(self, key: bytes, body: bytes, request_id: str = "") -> None:
        """Store a successful answer (written with the next batch)."""
        pending = self._pending
        pending[key] = (body, request_id)
        n = len(pending)
        if n == 1 or n >= self._batch_rows:
            if n >= self._most_waiting:
                # Without a flusher, a full batch; with one, two batches it has not taken yet (its thread is
                # still writing, or answers came in a burst): write them now, after the batch being written. So
                # fewer than four batches are ever uncommitted.
                self.flush()
            elif self._wake is not None:
                self._wake.set()

    def flush(self) -> None:
        """Write every waiting row now, on the calling thread (after a batch the writer thread is writing)."""
        if self._closed:
            return
        with self._write_lock:
            if self._pending:
                # The rows stay visible in `_pending` until they are committed.
                self._insert(self._db, self._pending)
                self._pending = {}

    def _insert(self, db: sqlite3.Connection, rows: dict[bytes, tuple[bytes, str]]) -> None:
        """Commit `rows` in one transaction (call with the write lock held)."""
        if not rows:
            return
        now = time.time()
        params = [x for k, (b, r) in rows.items() for x in (_from_bytes(k[:8], "little", signed=True), k, b, r, now)]
        step = self._rows_per_insert * _COLUMNS
        if len(params) <= step:
            # One statement in autocommit mode is one transaction: a single call into SQLite, the GIL released.
            db.execute(self._sql(len(rows)), params)
        else:
            db.execute("BEGIN")
            try:
                for i in range(0, len(params), step):
                    part = params[i:i + step]
                    db.execute(self._sql(len(part) // _COLUMNS), part)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.writes += len(rows)

    def _sql(self, n: int) -> str:
        sql = self._insert_sql.get(n)
        if sql is None:
            sql = self._insert_sql[n] = ("INSERT INTO responses (h, key, body, request_id, created) VALUES " +
                                         ",".join(["(?,?,?,?,?)"] * n))
        return sql

    def _write_behind(self, db: sqlite3.Connection, rows: dict[bytes, tuple[bytes, str]]) -> None:
        # On a worker thread: `rows` (the flusher's `_writing`) stay visible to `get` until they are committed;
        # emptied once they are, which tells the flusher they were.
        with self._write_lock:
            self._insert(db, rows)
            rows.clear()

    async def _wait_wake(self) -> None:
        self._wake = wake = anyio.Event()
        try:
            await wake.wait()
        finally:
            self._wake = None

    async def run_flusher(self) -> None:
        """Write batches behind the loop (see the module docstring) until cancelled; then write what waits."""
        wdb = _connect(self.path)
        self._most_waiting = 2 * self._batch_rows
        try:
            while True:
                if not self._pending:
                    await self._wait_wake()
                if len(self._pending) < self._batch_rows:
                    with anyio.move_on_after(self.flush_interval):  # gather a batch: one transaction per interval
                        await self._wait_wake()
                if not self._pending:
                    continue  # `put` wrote them itself meanwhile
                rows = self._writing = self._pending
                self._pending = {}
                try:
                    # Not abandoned on cancel: a batch being written is finished before the task ends.
                    await anyio.to_thread.run_sync(self._write_behind, wdb, rows)
                finally:
                    self._writing = {}
                    if rows:  # cancelled before the thread started: back in line for the final flush
                        rows.update(self._pending)
                        self._pending = rows
        finally:
            self._most_waiting = self._batch_rows
            try:
                self.flush()
            finally:
                wdb.close()

    def keys(self) -> Iterable[bytes]:
        for (k,) in self._db.execute("SELECT key FROM responses"):
            yield k

    def __len__(self) -> int:
        self.flush()
        return self._db.execute("SELECT count(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._db.close()
