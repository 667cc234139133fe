"""Content-addressed response cache: SQLite in WAL mode, one row per answered request. Resume lives here.

Identity (DESIGN.md): a request's key is a 16-byte BLAKE2b digest of the provider of its base URL (the host name),
its URL path, an explicit sample index and its canonical body (JSON with sorted keys). Nothing else goes in: no
API key, no header, no run fingerprint. Editing one input line changes one key.

Guarantees:
- `put` never blocks on disk: rows wait in memory and are written by `flush`, one transaction per batch
  (`executemany`), when `batch_rows` are waiting or `flush_interval` seconds after the first waiting row
  (the engine owns the task that calls `run_flusher`) and on close. A commit appends to the WAL and does not
  wait for the disk (no fsync). While `run_flusher` runs, the WAL is copied into the database (a checkpoint, the
  step that does fsync) by a worker thread on a connection of its own, after every `checkpoint_rows` rows
  written, instead of by whichever commit crosses SQLite's threshold on the event loop; once the WAL holds 32 MB
  the loop copies the rest itself, so the WAL stays bounded.
- A key is stored at most once per answer; should two rows ever hold one key, either answer is valid.
- A waiting row is already visible to `get`/`get_many`, so a rerun inside one process never sends twice.
- Keys are indexed in sorted passes (see `_SCHEMA`): every `merge_rows` answers, at `close()`, and when a file a
  killed run left is opened. Until then this cache finds its own answers through an in-memory map (fewer than
  `merge_rows` entries); another process sharing the file sees them once they are indexed.
- WAL with synchronous=NORMAL: a committed batch survives the process being killed (kill -9) at any moment;
  a kill loses at most the rows not yet committed (answers in flight or received in the last interval), and never
  corrupts the file. Only successful (HTTP 200) answers are stored.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import anyio

# Rows are appended in rowid order to `responses`, which has no index of its own: an index on a random key takes
# a random page per row, and SQLite writes every page a commit touches to the WAL (about 4 KB per answer, twice
# with the checkpoint). Keys are found through `lookup` (the key's first 8 bytes -> row id), filled in sorted
# passes of `merge_rows` rows: one walk through that index per pass instead of a random page per answer. Rows past
# `indexed_upto` (fewer than `merge_rows`) are found through an in-memory map until they are merged. A pass holds
# the event loop: 4,096 rows took about 4 ms (at most 15 ms, up to 100k answers here) for the same CPU per answer
# as 16,384-row passes, which took 10-26 ms, as long as the collector pauses that once cost 429s (tuning.py).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    h INTEGER NOT NULL,
    key BLOB NOT NULL,
    body BLOB NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lookup (h INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (h, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_VERSION = "3"
_BY_H = "SELECT r.key, r.body, r.request_id FROM lookup l JOIN responses r ON r.id = l.id WHERE l.h "
# Index every row not in `lookup` yet (idempotent: a pass repeated or interrupted indexes nothing twice).
_MERGE = """
INSERT OR IGNORE INTO lookup (h, id)
SELECT h, id FROM responses WHERE id > (SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'indexed_upto')
ORDER BY h
"""
_MARK_MERGED = ("UPDATE meta SET value = (SELECT CAST(coalesce(max(id), 0) AS TEXT) FROM responses) "
                "WHERE name = 'indexed_upto'")
_UNINDEXED = ("SELECT (SELECT coalesce(max(id), 0) FROM responses) > CAST(value AS INTEGER) FROM meta "
              "WHERE name = 'indexed_upto'")
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


_WAL_CAP_FRAMES = 8192  # pages (32 MB at SQLite's default page size)


def _checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
    """(busy, frames in the WAL, frames copied) of one PASSIVE checkpoint."""
    return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]  # all rows: the statement ends here


class CacheError(Exception):
    pass


class ResponseCache:
    """See the module docstring."""

    def __init__(self, path: str | os.PathLike[str], batch_rows: int = 512, flush_interval: float = 0.05,
                 checkpoint_rows: int = 2048, merge_rows: int = 4096) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The engine calls this from one thread at a time (the event loop's, or a worker thread at close).
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._recent: dict[bytes, int] = {}  # committed, not yet in `lookup`: key -> row id
            self._open_format()
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: not a usable cache database ({exc})") from None
        self._merge_rows = max(1, merge_rows)
        self._pending: dict[bytes, tuple[bytes, str]] = {}
        self._batch_rows = batch_rows
        self.flush_interval = flush_interval
        self._signal: anyio.Event | None = None  # set when a row starts waiting; owned by run_flusher
        self._closed = False
        self.writes = 0
        self.checkpoint_rows = checkpoint_rows
        self._ckpt_due: anyio.Event | None = None  # set when checkpoint_rows were written; owned by run_flusher
        self._ckpt_mark = 0  # `writes` at the last checkpoint

    def _open_format(self) -> None:
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE name='version'").fetchone()
        if row is not None and row[0] not in ("2", _VERSION):
            raise CacheError(f"{self.path}: cache format {row[0]}, this version reads {_VERSION}")
        if row is None or row[0] == "2":
            # New, or written by the version that indexed `responses` itself: index every row in `lookup`.
            self._transaction(f"INSERT OR REPLACE INTO meta VALUES ('version', '{_VERSION}')",
                              "INSERT OR REPLACE INTO meta VALUES ('indexed_upto', '0')",
                              "DROP INDEX IF EXISTS responses_h", _MERGE, _MARK_MERGED)
        else:
            state = db.execute(_UNINDEXED).fetchone()
            if state is None:  # no mark (not written by this code): index everything
                db.execute("INSERT INTO meta VALUES ('indexed_upto', '0')")
            if state is None or state[0]:
                self._merge()  # rows a killed run committed but did not index

    def _transaction(self, *statements: str) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql in statements:
                db.execute(sql)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _merge(self) -> None:
        """Index in `lookup`, in one sorted pass, every row not indexed yet (ours and a killed run's)."""
        self._transaction(_MERGE, _MARK_MERGED)
        self._recent = {}

    # -- reads ----------------------------------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes, str] | None:
        """(body, request_id) stored for `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[bytes]) -> dict[bytes, tuple[bytes, str]]:
        """The stored answers among `keys` (one query per up to 500 keys)."""
        found: dict[bytes, tuple[bytes, str]] = {}
        pending = self._pending
        recent = self._recent
        by_id: dict[int, bytes] = {}
        ask = []
        for k in keys:
            hit = pending.get(k)
            if hit is not None:
                found[k] = hit
                continue
            rowid = recent.get(k)
            if rowid is not None:
                by_id[rowid] = k
            else:
                ask.append(k)
        db = self._db
        ids = list(by_id)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            sql = "SELECT id, body, request_id FROM responses WHERE id IN (%s)" % ",".join("?" * len(chunk))
            for rowid, body, rid in db.execute(sql, chunk):
                found[by_id[rowid]] = (body, rid)
        if ask:
            wanted = set(ask)
            for i in range(0, len(ask), 500):
                chunk = [_h(k) for k in ask[i:i + 500]]
                for k, body, rid in db.execute(_BY_H + "IN (%s)" % ",".join("?" * len(chunk)), chunk):
                    if k in wanted:
                        found[k] = (body, rid)
        return found

    # -- writes ---------------------------------------------------------------------------------------------------

    def put(self, key: bytes, body: bytes, request_id: str = "") -> None:
        """Store a successful answer (written with the next batch)."""
        pending = self._pending
        pending[key] = (body, request_id)
        if len(pending) == 1:
            if self._signal is not None:
                self._signal.set()
        elif len(pending) >= self._batch_rows:
            self.flush()

    def flush(self) -> None:
        """Write every waiting row in one transaction."""
        if not self._pending or self._closed:
            return
        now = time.time()
        pending = self._pending
        rows = [(_from_bytes(k[:8], "little", signed=True), k, b, r, now) for k, (b, r) in pending.items()]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # The write lock is ours from BEGIN IMMEDIATE: the rows get the ids after the largest, in order.
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM responses").fetchone()[0]
            db.executemany("INSERT INTO responses (h, key, body, request_id, created) VALUES (?,?,?,?,?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._recent.update(zip(pending, range(first, first + len(rows))))
        self.writes += len(rows)
        pending.clear()
        if len(self._recent) >= self._merge_rows:
            self._merge()
        if self._ckpt_due is not None and self.writes - self._ckpt_mark >= self.checkpoint_rows:
            self._ckpt_due.set()

    async def run_flusher(self) -> None:
        """Flush `flush_interval` seconds after a row starts waiting and checkpoint the WAL on a worker thread;
        runs until cancelled (then flushes)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_checkpoints)
                while True:
                    self._signal = signal = anyio.Event()
                    if not self._pending:
                        await signal.wait()
                    await anyio.sleep(self.flush_interval)  # gather a batch: one transaction per interval
                    self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                self.flush()

    async def _run_checkpoints(self) -> None:
        # The loop's connection no longer checkpoints by itself; a connection of its own does, on a worker thread,
        # alongside the loop's commits (SQLite lets a PASSIVE checkpoint run while a writer appends). The WAL only
        # starts over from its beginning when a commit finds every frame copied, which a commit made during the
        # checkpoint prevents; so once it holds `_WAL_CAP_FRAMES`, the loop copies the (small) rest itself between
        # two of its own commits, and the WAL stays bounded.
        ckpt = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        try:
            while True:
                self._ckpt_due = due = anyio.Event()
                await due.wait()
                self._ckpt_mark = self.writes
                # Not abandoned on cancel: shutdown waits for the checkpoint to end before closing.
                _, frames, _ = await anyio.to_thread.run_sync(_checkpoint, ckpt)
                if frames >= _WAL_CAP_FRAMES and not self._closed:
                    _checkpoint(self._db)
        finally:
            self._ckpt_due = None
            ckpt.close()
            if not self._closed:
                self._db.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default

    def keys(self) -> Iterable[bytes]:
        for (k,) in self._db.execute("SELECT key FROM responses"):
            yield k

    def __len__(self) -> int:
        self.flush()
        return self._db.execute("SELECT count(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Write what waits and index it (a run pays for indexing its own answers), then close."""
        if self._closed:
            return
        self.flush()
        if self._recent:
            self._merge()
        self._closed = True
        self._db.close()
