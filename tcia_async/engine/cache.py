"""Content-addressed response cache: SQLite in WAL mode, one row per flushed batch of answers. Resume lives here.

Identity (DESIGN.md): a request's key is a 16-byte BLAKE2b digest of the provider of its base URL (the host name),
its URL path, an explicit sample index and its canonical body (JSON with sorted keys). Nothing else goes in: no
API key, no header, no run fingerprint. Editing one input line changes one key.

Guarantees:
- `put` never blocks on disk: answers wait in memory and are written by `flush`, one transaction and one row per
  batch, when `batch_rows` are waiting or `flush_interval` seconds after the first waiting answer (the engine owns
  the task that calls `run_flusher`) and on close. A commit appends to the WAL and does not wait for the disk (no
  fsync). With the inline writer, while `run_flusher` runs, the WAL is copied into the database (a checkpoint,
  the step that does fsync) by a worker thread on a connection of its own, after every `checkpoint_rows` answers
  written, instead of by whichever commit crosses SQLite's threshold on the event loop; once the WAL holds 32 MB
  the loop copies the rest itself, so the WAL stays bounded. (A writer process checkpoints as SQLite does by
  default: in that process, its fsync blocks nobody.)
- A key is stored at most once per answer; should two entries ever hold one key, either answer is valid.
- A waiting answer is already visible to `get`/`get_many`, so a rerun inside one process never sends twice.
- Keys are indexed in sorted passes (see `_SCHEMA`): every `merge_rows` answers, at `close()`, and when a file a
  killed run left is opened. Until then this cache finds its own answers through an in-memory map (fewer than
  `merge_rows` entries); another process sharing the file sees them once they are indexed.
- WAL with synchronous=NORMAL: a committed batch survives the process being killed (kill -9) at any moment;
  a kill loses at most the answers not yet committed (in flight or received in the last interval), and never
  corrupts the file. Only successful (HTTP 200) answers are stored.
- A file of formats 2 and 3 (one row per answer) is converted in place when opened, in one transaction.
- writer="process" (what the Engine uses): `flush` hands the batch to a child process (see "The writer process"
  at the end), which writes, indexes and checkpoints; this connection only reads. Handed-over answers stay
  visible from memory until the child reports them indexed; a kill -9 of this process loses only the answers
  not handed over yet (the child writes the rest and exits). `close` waits for the child to finish.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import deque
from array import array
from collections.abc import Iterable, Iterator
from itertools import accumulate, chain, pairwise
from pathlib import Path

import anyio
import msgspec

# Format 4. Each flush appends ONE row to `batches` holding the whole batch: its keys, answers and request ids
# concatenated, with the end offsets of the answers. SQLite's cost is per row inserted (sqlite3_step ~6k
# instructions a row, binding its values ~3k, pysqlite's executemany loop): with a row per answer (format 3) a flush
# of 64 answers cost 2.8 us of CPU per answer on the event loop, as one row 1.0 us (benchmarks/cache_write.py has
# the whole cycle). Python 3.11's sqlite3 runs every `bytes` value through its adaptation protocol (two failed
# attribute lookups, each building an AttributeError) but binds `bytearray` directly: blobs go in as bytearray.
# Small columns come first: reading a column stored after a large blob walks the blob's overflow pages.
#
# `batches` has no index: keys are found through `lookup` (h = the key's first 8 bytes as a signed little-endian
# integer, loc = batch id << 16 | index in the batch), filled from Python in sorted passes of `merge_rows` answers:
# one walk through the index per pass instead of a random page per answer (SQLite writes every page a commit
# touches to the WAL, about 4 KB each); a pass of 4,096 holds the event loop about 5 ms. Batches past `indexed_upto`
# are found through an in-memory map until they are merged. A read compares the stored key in full (`h` is half
# of it) and reads each batch row once for all the keys it holds; the batches read last (`_MEMO_BYTES`) are kept
# for the next lookups.
#
# `rids` holds the request ids (HTTP header values, often empty) joined by newlines, UTF-8 with surrogates passed
# through (aiohttp decodes header bytes with surrogateescape), and `rid_ends` is empty; should an id hold a newline,
# the ids are concatenated and `rid_ends` gives their ends in code points. Offsets are uint32 little-endian.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    n INTEGER NOT NULL,
    keys BLOB NOT NULL,
    ends BLOB NOT NULL,
    rid_ends BLOB NOT NULL,
    rids BLOB NOT NULL,
    bodies BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS lookup (h INTEGER NOT NULL, loc INTEGER NOT NULL, PRIMARY KEY (h, loc)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_VERSION = "4"
_OLD_VERSIONS = ("2", "3")  # one row per answer in `responses`: converted when opened
_SHIFT = 16  # loc = batch id << _SHIFT | index in the batch
_ROW_ANSWERS = 1 << _SHIFT
_ROW_BYTES = 256 << 20  # answers per row stay under SQLite's 1 GB limit on a value
_CONVERT_ANSWERS = 512  # answers per row when converting an older file (the engine's largest batch)
_INDEX_ANSWERS = 65536  # answers sorted at once when converting (bounds memory)
_MEMO_BYTES = 8 << 20  # batches read lately, kept decoded for the next lookups (sequential replay)
_INSERT = "INSERT INTO batches (created, n, keys, ends, rid_ends, rids, bodies) VALUES (?,?,?,?,?,?,?)"
_READ = "SELECT id, keys, ends, rid_ends, rids, bodies FROM batches WHERE id IN "
# `lookup` rows go in as one statement per 256 rows (cheaper than executemany's row-at-a-time loop), the rest of a
# pass through executemany; both statements stay in sqlite3's statement cache.
_LOOKUP_ROWS = 256
_LOOKUP_MANY = "INSERT OR IGNORE INTO lookup (h, loc) VALUES " + ",".join(["(?,?)"] * _LOOKUP_ROWS)
_LOOKUP_ONE = "INSERT OR IGNORE INTO lookup (h, loc) VALUES (?,?)"
_from_bytes = int.from_bytes
_blake2b = hashlib.blake2b
_SWAP = sys.byteorder != "little"
assert array("I").itemsize == 4


def sql_params(n: int) -> str:
    """`(?,?,...)`: the placeholders of n parameters, for `IN` lists."""
    return "(?" + ",?" * (n - 1) + ")"


def _h(key: bytes) -> int:
    return _from_bytes(key[:8], "little", signed=True)


def key_prefix(provider: str, path: str) -> bytes:
    """The part of every key shared by all requests to one (provider, URL path); compute it once."""
    return f"{provider}\n{path}\n".encode()


def request_key(prefix: bytes, sample: int, canonical_body: bytes) -> bytes:
    """The cache key of one request. `canonical_body` is `orjson.dumps(body, option=OPT_SORT_KEYS)`."""
    return _blake2b(b"%s%d\n%s" % (prefix, sample, canonical_body), digest_size=16).digest()


def _u32(values: Iterable[int]) -> bytearray:
    a = array("I", values)
    if _SWAP:
        a.byteswap()
    return bytearray(a)


def _from_u32(blob: bytes) -> array:
    a = array("I")
    a.frombytes(blob)
    if _SWAP:
        a.byteswap()
    return a


def _batch_rows(created: float, keys: list[bytes], bodies: tuple[bytes, ...], rids: tuple[str, ...]) -> list[tuple]:
    """The values of the `batches` rows holding these answers (see `_SCHEMA`): one row unless they are more or
    larger than one row may hold."""
    ends = list(accumulate(map(len, bodies)))
    if len(keys) <= _ROW_ANSWERS and ends[-1] <= _ROW_BYTES:
        return [_row(created, keys, bodies, rids, ends)]
    rows = []
    start = 0
    while start < len(keys):
        base = ends[start - 1] if start else 0
        stop = start + 1
        while stop < len(keys) and stop - start < _ROW_ANSWERS and ends[stop] - base <= _ROW_BYTES:
            stop += 1
        rows.append(_row(created, keys[start:stop], bodies[start:stop], rids[start:stop],
                         [e - base for e in ends[start:stop]]))
        start = stop
    return rows


def _row(created: float, keys: list[bytes], bodies: tuple[bytes, ...], rids: tuple[str, ...],
         ends: list[int]) -> tuple:
    text = "\n".join(rids)
    if text.count("\n") == len(rids) - 1:
        rid_ends = bytearray()  # no id holds a newline: the ids are `rids` split at newlines
    else:
        text = "".join(rids)
        rid_ends = _u32(accumulate(map(len, rids)))
    return (created, len(keys), bytearray().join(keys), _u32(ends), rid_ends,
            bytearray(text.encode("utf-8", "surrogatepass")), bytearray().join(bodies))


def _firsts(keys: bytes | bytearray) -> list[int]:
    """`h` of each key in `keys`, 16-byte keys concatenated, computed in C."""
    firsts = memoryview(keys).cast("q")[::2]  # the first 8 bytes of each key, in the machine's byte order
    if _SWAP:
        firsts = array("q", firsts)
        firsts.byteswap()
    return firsts.tolist()


def _index_rows(batches: Iterable[tuple[int, bytes]]) -> list[int]:
    """The `lookup` rows of the answers in `batches` ((batch id, its keys), the keys as stored) sorted by h, as
    [h0, loc0, h1, loc1, ...]; the loop stays in C (no Python code per answer)."""
    hs: list[int] = []
    locs: list[int] = []
    for bid, keys in batches:
        if not keys:
            continue
        hs += _firsts(keys)
        locs += range(bid << _SHIFT, (bid << _SHIFT) + len(keys) // 16)
    by_h = dict(zip(hs, locs))
    if len(by_h) < len(hs):  # two keys share their first half
        return list(chain.from_iterable(sorted(zip(hs, locs))))
    order = sorted(by_h)  # sorting ints is cheaper than sorting pairs
    flat: list[int] = [0] * (2 * len(order))
    flat[::2] = order
    flat[1::2] = map(by_h.__getitem__, order)
    return flat


def _insert_lookup(db: sqlite3.Connection, flat: list[int]) -> None:
    step = 2 * _LOOKUP_ROWS
    full = len(flat) - len(flat) % step
    for i in range(0, full, step):
        db.execute(_LOOKUP_MANY, flat[i:i + step])
    if full < len(flat):
        db.executemany(_LOOKUP_ONE, zip(flat[full::2], flat[full + 1::2]))


_WAL_CAP_FRAMES = 8192  # pages (32 MB at SQLite's default page size)


def _checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
    """(busy, frames in the WAL, frames copied) of one PASSIVE checkpoint."""
    return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]  # all rows: the statement ends here


class CacheError(Exception):
    pass


class _Batch:
    """One `batches` row as read, decoded: answer i is keys[16 i:16 i + 16], bodies[ends[i]:ends[i + 1]], rids[i]."""

    __slots__ = ("bodies", "ends", "keys", "rids")

    def __init__(self, keys: bytes, ends: bytes, rid_ends: bytes, rids: bytes, bodies: bytes) -> None:
        self.keys = keys
        self.ends = [0, *_from_u32(ends)]
        text = rids.decode("utf-8", "surrogatepass")
        if rid_ends:
            cuts = [0, *_from_u32(rid_ends)]
            self.rids = [text[a:b] for a, b in pairwise(cuts)]
        else:
            self.rids = text.split("\n")
        self.bodies = bodies


class ResponseCache:
    """See the module docstring."""

    def __init__(self, path: str | os.PathLike[str], batch_rows: int = 512, flush_interval: float = 0.05,
                 checkpoint_rows: int = 2048, merge_rows: int = 4096, writer: str = "inline") -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recent: dict[bytes, int] = {}  # committed, not yet in `lookup`: key -> loc
        self.merges = 0  # indexing passes made
        self._recent_batches: dict[int, bytearray] = {}  # the batches in `_recent`: id -> keys
        self._memo: dict[int, _Batch] = {}  # batch id -> batch, oldest first; at most _MEMO_BYTES of bodies
        self._memo_bytes = 0
        db = None
        try:
            # The engine calls this from one thread at a time (the event loop's, or a worker thread at close).
            self._db = db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._open_format()
        except (sqlite3.DatabaseError, CacheError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"{self.path}: not a usable cache database ({exc})") from None
        self._merge_rows = max(1, merge_rows)
        self._pending: dict[bytes, tuple[bytes, str]] = {}
        self._batch_rows = batch_rows
        self.flush_interval = flush_interval
        self._signal: anyio.Event | None = None  # set when an answer starts waiting; owned by run_flusher
        self._closed = False
        self.writes = 0
        self.checkpoint_rows = checkpoint_rows
        self._ckpt_due: anyio.Event | None = None  # set when checkpoint_rows were written; owned by run_flusher
        self._ckpt_mark = 0  # `writes` at the last checkpoint
        # writer="process": batches are written, indexed and checkpointed by a child process (`_Writer`); this
        # connection only reads. Answers sent to it stay in `_unindexed` until it reports them indexed.
        if writer not in ("inline", "process"):
            raise ValueError(f"writer is 'inline' or 'process', not {writer!r}")
        self._unindexed: dict[bytes, tuple[bytes, str]] = {}
        self._writer: _Writer | None = None
        if writer == "process" and sys.executable:  # (an embedding interpreter may have no executable to run)
            try:
                self._writer = _Writer(self.path, self._merge_rows)
            except OSError:
                self._writer = None  # no process can be started here: write inline (same results, loop's CPU)
            except BaseException:
                self._db.close()
                raise

    # -- opening --------------------------------------------------------------------------------------------------

    def _open_format(self) -> None:
        """Create, convert or check the file, then index the batches a killed run committed but did not index."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # the write lock first: two processes opening one new file create it once
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
                version = row and row[0]
            if version not in (None, _VERSION, *_OLD_VERSIONS):
                raise CacheError(f"{self.path}: cache format {version}, this version reads {_VERSION}")
            if version in _OLD_VERSIONS or (version is None and "responses" in tables):
                self._convert()
            elif version is None:
                for sql in _SCHEMA.strip().split(";\n"):
                    db.execute(sql)
                db.execute(f"INSERT OR REPLACE INTO meta VALUES ('version', '{_VERSION}')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('indexed_upto', '0')")  # none: index everything
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        mark, last = db.execute("SELECT CAST(value AS INTEGER), (SELECT coalesce(max(id), 0) FROM batches) "
                                "FROM meta WHERE name = 'indexed_upto'").fetchone()
        if last > mark:
            self._merge()

    def _convert(self) -> None:
        """Rewrite a format-2/3 file (a `responses` row per answer) as format 4, inside the open transaction:
        an interrupted conversion leaves the old file as it was, and the next open starts over."""
        db = self._db
        db.execute("DROP TABLE IF EXISTS lookup")  # format 3's (h, row id)
        for sql in _SCHEMA.strip().split(";\n"):
            db.execute(sql)
        rows = db.execute("SELECT key, body, request_id, created FROM responses ORDER BY id")
        group: list[tuple[bytes, bytes, str]] = []
        size = 0
        created = None
        written: list[tuple[int, bytearray]] = []  # (batch id, keys) not in `lookup` yet

        def write() -> None:
            keys, bodies, rids = zip(*group)
            for row in _batch_rows(created, list(keys), bodies, rids):
                written.append((db.execute(_INSERT, row).lastrowid, row[2]))
            if len(written) * _CONVERT_ANSWERS >= _INDEX_ANSWERS:
                _insert_lookup(db, _index_rows(written))
                written.clear()

        while chunk := rows.fetchmany(4096):
            for key, body, rid, when in chunk:
                body = bytes(body) if not isinstance(body, str) else body.encode()
                # Answers of one old flush (one `created`) stay together.
                if group and (when != created or len(group) >= _CONVERT_ANSWERS or size + len(body) > _ROW_BYTES):
                    write()
                    group, size = [], 0
                group.append((bytes(key), body, rid or ""))
                size += len(body)
                created = when
        rows.close()
        if group:
            write()
        _insert_lookup(db, _index_rows(written))
        db.execute("DROP TABLE responses")  # and format 2's index on it
        db.execute(f"INSERT OR REPLACE INTO meta VALUES ('version', '{_VERSION}')")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('indexed_upto', "
                   "(SELECT CAST(coalesce(max(id), 0) AS TEXT) FROM batches))")

    # -- indexing -------------------------------------------------------------------------------------------------

    def _merge(self) -> None:
        """Index in `lookup`, in sorted passes, every batch not indexed yet: ours from `_recent`, any other (a
        killed run's, or another process's) read from the file."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            mark = db.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'indexed_upto'").fetchone()[0]
            newer = [bid for (bid,) in db.execute("SELECT id FROM batches WHERE id > ?", (mark,))]
            ours = self._recent_batches
            others = [bid for bid in newer if bid not in ours]
            for i in range(0, len(others), 64):
                part = others[i:i + 64]
                sql = "SELECT id, keys FROM batches WHERE id IN " + sql_params(len(part))
                _insert_lookup(db, _index_rows(db.execute(sql, part).fetchall()))
            if ours:
                _insert_lookup(db, _index_rows(ours.items()))
            if newer:
                db.execute("UPDATE meta SET value = ? WHERE name = 'indexed_upto'", (str(max(newer)),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._recent = {}
        self._recent_batches = {}
        self.merges += 1

    # -- reads ----------------------------------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes, str] | None:
        """(body, request_id) stored for `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[bytes]) -> dict[bytes, tuple[bytes, str]]:
        """The stored answers among `keys` (one query per up to 500 keys, each batch read once)."""
        found: dict[bytes, tuple[bytes, str]] = {}
        pending = self._pending
        recent = self._recent
        sent = self._unindexed
        locs: list[int] = []
        if ((pending and not pending.keys().isdisjoint(keys)) or (recent and not recent.keys().isdisjoint(keys))
                or (sent and not sent.keys().isdisjoint(keys))):
            ask = []
            for k in keys:
                hit = pending.get(k) or sent.get(k)
                if hit is not None:
                    found[k] = hit
                    continue
                loc = recent.get(k)
                if loc is not None:
                    locs.append(loc)
                else:
                    ask.append(k)
        else:  # the common case (a fresh run asks for answers it does not have), tested without a Python loop
            ask = keys
        db = self._db
        for i in range(0, len(ask), 500):
            part = ask[i:i + 500]
            joined = b"".join(part) if len(part) > 4 else b""  # a few keys: cheaper one by one
            hs = _firsts(joined) if len(joined) == 16 * len(part) else [_h(k) for k in part]
            locs.extend(loc for (loc,) in db.execute("SELECT loc FROM lookup WHERE h IN " + sql_params(len(part)), hs))
        if not locs:
            return found
        wanted = set(keys)
        memo = self._memo
        by_batch: dict[int, list[int]] = {}
        for loc in locs:
            by_batch.setdefault(loc >> _SHIFT, []).append(loc & (_ROW_ANSWERS - 1))
        missing = [bid for bid in by_batch if bid not in memo]
        for i in range(0, len(missing), 500):
            part = missing[i:i + 500]
            for bid, *cols in db.execute(_READ + sql_params(len(part)), part):
                self._remember(bid, _Batch(*cols))
        for bid, idxs in by_batch.items():
            batch = memo.get(bid)
            if batch is None:  # read above, then pushed out of the memo: read it again
                row = db.execute(_READ + "(?)", (bid,)).fetchone()
                if row is None:
                    continue
                batch = _Batch(*row[1:])
            stored, ends, rids, bodies = batch.keys, batch.ends, batch.rids, batch.bodies
            for i in idxs:
                k = stored[16 * i:16 * i + 16]
                if k in wanted:  # `h` is only half the key
                    found[k] = bodies[ends[i]:ends[i + 1]], rids[i]
        return found

    def _remember(self, bid: int, batch: _Batch) -> None:
        memo = self._memo
        size = len(batch.bodies)
        if size > _MEMO_BYTES:
            return
        memo[bid] = batch
        self._memo_bytes += size
        while self._memo_bytes > _MEMO_BYTES:
            self._memo_bytes -= len(memo.pop(next(iter(memo))).bodies)

    # -- writes ---------------------------------------------------------------------------------------------------

    def put(self, key: bytes, body: bytes, request_id: str = "") -> None:
        """Store a successful answer (written with the next batch). `key` is a `request_key` (16 bytes)."""
        if len(key) != 16:
            raise ValueError(f"cache keys are 16 bytes, not {len(key)}")
        pending = self._pending
        pending[key] = (body, request_id)
        if len(pending) == 1:
            if self._signal is not None:
                self._signal.set()
        elif len(pending) >= self._batch_rows:
            self.flush()

    def flush(self) -> None:
        """Write every waiting answer in one transaction (one row, unless the batch is huge); with a writer process,
        hand them to it (they stay visible here until it has indexed them)."""
        if not self._pending or self._closed:
            return
        pending = self._pending
        keys = list(pending)
        bodies, rids = zip(*pending.values())
        rows = _batch_rows(time.time(), keys, bodies, rids)
        writer = self._writer
        if writer is not None:
            writer.send(rows, list(pending.items()))
            self._unindexed.update(pending)
            self.writes += len(keys)
            pending.clear()
            writer.poll(self._unindexed)
            return
        self._write_rows(keys, rows)

    def _write_rows(self, keys: list[bytes], rows: list[tuple]) -> None:
        """Append `rows` (`_batch_rows` of the answers to `keys`, in order) in one transaction, then merge when
        `merge_rows` answers wait to be indexed."""
        db = self._db
        written = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                bid = db.execute(_INSERT, row).lastrowid
                written.append((bid, row[2], range(bid << _SHIFT, (bid << _SHIFT) + row[1])))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        recent = self._recent
        if len(written) == 1:
            recent.update(zip(keys, written[0][2]))
        else:
            recent.update(zip(keys, chain.from_iterable(r for _, _, r in written)))
        self._recent_batches.update((bid, blob) for bid, blob, _ in written)
        self.writes += len(keys)
        self._pending.clear()
        if len(recent) >= self._merge_rows:
            self._merge()
        if self._ckpt_due is not None and self.writes - self._ckpt_mark >= self.checkpoint_rows:
            self._ckpt_due.set()

    async def run_flusher(self) -> None:
        """Flush `flush_interval` seconds after an answer starts waiting and checkpoint the WAL on a worker
        thread; runs until cancelled (then flushes)."""
        try:
            async with anyio.create_task_group() as tg:
                if self._writer is None:  # a writer process checkpoints on its own
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

    def keys(self) -> Iterator[bytes]:
        """Every stored key (waiting answers are written first; with a writer process, those it has written)."""
        self.flush()
        for (blob,) in self._db.execute("SELECT keys FROM batches ORDER BY id"):
            for i in range(0, len(blob), 16):
                yield blob[i:i + 16]

    def __len__(self) -> int:
        """Answers stored (as `keys`)."""
        self.flush()
        return self._db.execute("SELECT coalesce(sum(n), 0) FROM batches").fetchone()[0]

    def close(self) -> None:
        """Write what waits and index it (a run pays for indexing its own answers), then close."""
        if self._closed:
            return
        try:
            self.flush()
            if self._writer is not None:
                self._writer.close(self._unindexed)  # it writes and indexes the rest, then exits
            elif self._recent:
                self._merge()
        finally:
            self._closed = True
            self._db.close()


# ----------------------------------------------------------------------------------------------------------------
# The writer process (writer="process")
# ----------------------------------------------------------------------------------------------------------------
#
# Measured with the engine at 20k requests (benchmarks/clients.py, cache on against off against writes skipped):
# writing on the event loop cost about 9.5 us of the loop's CPU per answer, five times what the same SQLite calls
# cost alone (benchmarks/cache_write.py), as they evicted the loop's working set and the checkpoint thread took
# the GIL back and forth. A thread cannot write without the GIL; a process can. This module, run as a script, is
# that process: it reads framed batches from stdin and writes them with an inline ResponseCache (the same code
# as above), which also indexes them and checkpoints the WAL (in this process: its fsync blocks nobody).
#
# Frames, parent -> child: 4-byte little-endian length, then msgpack of the `_batch_rows` rows of one flush.
# Child -> parent: b"A" + 8-byte little-endian frame count: every frame up to that one is indexed (sent after
# each merge and at the end); b"E" + 4-byte length + UTF-8 message: it failed and exits.
# When the parent dies (kill -9 included) the child reads end of file, writes and indexes every whole frame it
# got (a torn last frame is dropped), and exits: a kill loses only the answers not handed over yet. The child runs
# in a session of its own, so a Ctrl-C at the terminal reaches only the parent, which closes the pipe.

_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode
_ACK = b"A"
_ERR = b"E"


class _Writer:
    """The parent's end of a writer process."""

    def __init__(self, path: Path, merge_rows: int) -> None:
        # This file, run as a script; -P: its directory (engine/) does not go on sys.path, where its module names
        # could shadow others. The environment and site-packages are the parent's (anyio and msgspec come from
        # there, user installs included).
        argv = [sys.executable, "-P", os.path.abspath(__file__), "--writer", str(path), str(merge_rows)]
        # A session of its own: a Ctrl-C at the terminal reaches the parent only (which then closes the pipe),
        # never the child in the middle of a write; it ignores SIGINT too, should one be sent to it directly.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                     start_new_session=True)
        self._in = self.proc.stdin.fileno()  # type: ignore[union-attr]
        self._out = self.proc.stdout.fileno()  # type: ignore[union-attr]
        os.set_blocking(self._out, False)
        # `send` blocks the loop once the pipe is full, e.g. while the child waits for the disk at a checkpoint:
        # on Linux, let the pipe hold 1 MB (a few thousand answers) instead of 64 KB.
        try:
            import fcntl

            fcntl.fcntl(self._in, fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        self.sent = 0  # frames sent
        self._waiting: deque[tuple[int, list[tuple[bytes, tuple[bytes, str]]]]] = deque()  # (frame, answers)
        self._buf = b""
        self.error: str | None = None

    def send(self, rows: list[tuple], answers: list[tuple[bytes, tuple[bytes, str]]]) -> None:
        """Hand over one flush (blocks only when the pipe is full: the child is behind)."""
        if self.error is not None:
            raise CacheError(self.error)
        data = _encode(rows)
        try:
            _write_all(self._in, len(data).to_bytes(4, "little") + data)
        except OSError as exc:
            self._fail(f"the cache writer process is gone ({exc})")
        self.sent += 1
        self._waiting.append((self.sent, answers))

    def poll(self, unindexed: dict[bytes, tuple[bytes, str]]) -> None:
        """Read what the child reported without waiting; drop what it indexed from `unindexed`."""
        while True:
            try:
                chunk = os.read(self._out, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                if self.proc.poll() is not None and self._waiting:
                    self._fail(f"the cache writer process exited ({self.proc.returncode})")
                return
            self._take(chunk, unindexed)

    def _take(self, chunk: bytes, unindexed: dict[bytes, tuple[bytes, str]]) -> None:
        buf = self._buf + chunk
        while buf:
            if buf[:1] == _ACK:
                if len(buf) < 9:
                    break
                done = int.from_bytes(buf[1:9], "little")
                buf = buf[9:]
                waiting = self._waiting
                while waiting and waiting[0][0] <= done:
                    for k, v in waiting.popleft()[1]:
                        if unindexed.get(k) is v:  # not put again since
                            del unindexed[k]
            elif buf[:1] == _ERR:
                if len(buf) < 5 or len(buf) < 5 + int.from_bytes(buf[1:5], "little"):
                    break
                self._buf = b""
                self._fail("the cache writer process failed: " +
                           buf[5:5 + int.from_bytes(buf[1:5], "little")].decode("utf-8", "replace"))
            else:
                self._fail(f"the cache writer process sent {buf[:16]!r}")
        self._buf = buf

    def _fail(self, message: str) -> None:
        self.error = message
        raise CacheError(message)

    def close(self, unindexed: dict[bytes, tuple[bytes, str]]) -> None:
        """End of input: wait until the child has written and indexed everything and exited."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        os.set_blocking(self._out, True)
        while True:
            chunk = os.read(self._out, 1 << 16)
            if not chunk:
                break
            self._take(chunk, unindexed)
        code = self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        if code != 0 or self._waiting:
            self._fail(self.error or f"the cache writer process exited with {code} before indexing every answer")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _writer_main(path: str, merge_rows: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    frames = 0
    parent = [True]  # still listening

    def report(data: bytes) -> None:
        # A parent that died (kill -9) reads nothing more: the answers it handed over are written all the same.
        if parent[0]:
            try:
                out.write(data)
                out.flush()
            except OSError:
                parent[0] = False

    try:
        cache = ResponseCache(path, merge_rows=merge_rows)
        try:
            while True:
                head = inp.read(4)
                if len(head) < 4:
                    break
                size = int.from_bytes(head, "little")
                data = inp.read(size)
                if len(data) < size:
                    break  # the parent died in the middle of a frame
                rows = [(created, n, bytearray(keys), bytearray(ends), bytearray(rid_ends), bytearray(rids),
                         bytearray(bodies)) for created, n, keys, ends, rid_ends, rids, bodies in _decode(data)]
                keys = [bytes(blob[i:i + 16]) for row in rows for blob in (row[2],) for i in range(0, len(blob), 16)]
                merged_before = cache.merges
                cache._write_rows(keys, rows)
                frames += 1
                if cache.merges != merged_before:
                    report(_ACK + frames.to_bytes(8, "little"))
        finally:
            cache.close()
        report(_ACK + frames.to_bytes(8, "little"))
        return 0
    except BaseException as exc:  # reported to the parent, which raises CacheError
        message = f"{type(exc).__name__}: {exc}".encode()
        report(_ERR + len(message).to_bytes(4, "little") + message)
        return 1


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--writer":
    sys.exit(_writer_main(sys.argv[2], int(sys.argv[3])))
