"""Content-addressed response cache: one SQLite table from request key to answer. Resume lives here.

Identity (a request's key, `request_key`): a 16-byte BLAKE2b digest of the provider (scheme, host, port and path
of its base URL: two servers never share answers), the URL path, an explicit sample index and the canonical
body (JSON with sorted keys). No API key, no header, no run fingerprint: editing one input line changes one key.

What it guarantees:
- `put` never touches the disk: answers wait in memory, already visible to `get`/`get_many`, and are written in
  one transaction when `batch_rows` are waiting, `flush_interval` seconds after the first one started waiting
  (the engine runs `run_flusher`), and at `close`.
- WAL with synchronous=NORMAL: a committed batch survives a kill -9 at any moment; a kill loses at most the
  answers still waiting in memory, and never corrupts the file. Only successful answers are stored.
- One process at a time: `open` takes an exclusive lock on `PATH.lock` (held until `close`); a second process
  gets `CacheBusy` at once, naming the holder. (Waiting instead would look like a hang.)
- A file that is not a cache of this format is refused with `CacheError`, never reinterpreted or rewritten.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import anyio

FORMAT = "tcia-async-cache/1"  # meta.format; the key layout is part of it
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (key BLOB PRIMARY KEY, body BLOB NOT NULL, request_id TEXT NOT NULL,
                                    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_IN_CHUNK = 500  # keys per SELECT ... IN (...): below SQLite's parameter limit


class CacheError(Exception):
    """The cache file cannot be used (not a cache, another format, unreadable, or a failed write)."""


class CacheBusy(CacheError):
    """Another process holds the cache."""


def key_prefix(provider: str, path: str) -> bytes:
    """The part of every key shared by all requests to one (provider, URL path); compute it once."""
    return f"{provider}\n{path}\n".encode()


def request_key(prefix: bytes, sample: int, canonical_body: bytes) -> bytes:
    """The cache key of one request. `canonical_body` is `orjson.dumps(body, option=OPT_SORT_KEYS)`."""
    return hashlib.blake2b(b"%s%d\n%s" % (prefix, sample, canonical_body), digest_size=16).digest()


def sql_params(n: int) -> str:
    """`(?,?,...)`: the placeholders of n parameters, for `IN` lists."""
    return "(" + ",".join("?" * n) + ")"


def is_cache(path: Path) -> bool:
    """Whether `path` is a response cache of this format, looked at read-only (someone else's file is not touched,
    and no lock file is made beside it)."""
    if not path.is_file():
        return False
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE name='format'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == FORMAT


class FileLock:
    """An exclusive advisory lock on a file, naming its holder in it (fcntl; where there is none, no lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None
        self._made = False  # this lock made its file (then `discard` removes it)

    def take(self, busy: Callable[[str], Exception]) -> None:
        """Hold the lock, or raise `busy(holder)` when another process holds it."""
        try:
            import fcntl
        except ImportError:  # Windows: no fcntl; one writer is then the user's to ensure
            return
        self._made = not self.path.exists()
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if holder == f"tcia-async process {os.getpid()}":
                holder = "this process (another Engine or command of it holds the file)"
            raise busy(holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"tcia-async process {os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the lock
            self._fh = None

    def discard(self) -> None:
        """Release, and remove the lock's file when this lock made it: a file refused leaves nothing beside it."""
        held = self._fh is not None
        self.release()
        if held and self._made:
            self.path.unlink(missing_ok=True)


class ResponseCache:
    """See the module docstring. Not thread-safe: one event loop uses it."""

    def __init__(self, path: str | os.PathLike[str], batch_rows: int = 256, flush_interval: float = 0.05) -> None:
        self.path = Path(path)
        self.batch_rows = max(1, batch_rows)
        self.flush_interval = flush_interval
        self._waiting: dict[bytes, tuple[bytes, str]] = {}
        self._full: anyio.Event | None = None  # set when batch_rows are waiting
        self._first: anyio.Event | None = None  # set when the first answer starts waiting
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise CacheError(f"{self.path}: is a directory, not a cache file")
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(16)
        except FileNotFoundError:
            head = b""
        except OSError as exc:
            raise CacheError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        if head and head != b"SQLite format 3\x00":  # refused before its lock file is made beside it
            raise CacheError(f"{self.path}: not a usable cache (not an SQLite database); delete it or use another "
                             "cache file (--cache)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.take(lambda holder: CacheBusy(
            f"{self.path}: the cache is in use by {holder}; wait for that run to finish, or give this run another "
            "cache file (--cache PATH). Two runs on one cache would pay for the same requests twice."))
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                # Look before writing anything: a file that is not ours is refused untouched.
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "meta" not in tables:
                    raise CacheError(f"{self.path}: not a tcia-async cache of this version (tables "
                                     f"{', '.join(sorted(tables))}); delete it or use another cache file "
                                     "(--cache)")
                row = db.execute("SELECT value FROM meta WHERE name='format'").fetchone() if tables else None
                if tables and row is None:
                    raise CacheError(f"{self.path}: a cache without a format mark; delete it or use another "
                                     "cache file (--cache)")
                if row is not None and row[0] != FORMAT:
                    raise CacheError(f"{self.path}: a cache of format {row[0]!r}, this version reads {FORMAT!r}; "
                                     "its keys would not mean the same: delete it or use another cache file "
                                     "(--cache)")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            except BaseException:
                db.close()
                raise
        except sqlite3.DatabaseError as exc:
            self._lock.discard()
            raise CacheError(f"{self.path}: not a usable cache ({exc})") from None
        except BaseException:
            self._lock.discard()
            raise
        return db

    # -- reads ------------------------------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes, str] | None:
        """(answer body, request id) of `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[bytes]) -> dict[bytes, tuple[bytes, str]]:
        """{key: (answer body, request id)} for the keys that have an answer."""
        found: dict[bytes, tuple[bytes, str]] = {}
        rest: list[bytes] = []
        for k in keys:
            hit = self._waiting.get(k)
            if hit is not None:
                found[k] = hit
            else:
                rest.append(k)
        for i in range(0, len(rest), _IN_CHUNK):
            part = rest[i:i + _IN_CHUNK]
            try:
                rows = self._db.execute(f"SELECT key, body, request_id FROM answers WHERE key IN "
                                        f"{sql_params(len(part))}", part).fetchall()
            except sqlite3.Error as exc:
                raise CacheError(f"{self.path}: cannot be read ({exc})") from None
            for k, body, rid in rows:
                found[k] = (body, rid)
        return found

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM answers").fetchone()[0] + len(self._waiting)

    # -- writes -----------------------------------------------------------------------------------------------

    def put(self, key: bytes, body: bytes, request_id: str = "") -> None:
        """Keep an answer; it is written with the next batch."""
        if len(key) != 16:
            raise ValueError("cache keys are 16 bytes (request_key)")
        self._waiting[key] = (body, request_id)
        n = len(self._waiting)
        if n == 1 and self._first is not None:
            self._first.set()
        if n >= self.batch_rows and self._full is not None:
            self._full.set()

    def flush(self) -> None:
        """Write every waiting answer in one transaction; they are read from the file from then on."""
        if not self._waiting:
            return
        now = time.time()
        rows = [(k, b, r, now) for k, (b, r) in self._waiting.items()]
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CacheError(f"{self.path}: cannot be written ({exc}); answers since the last write are lost, a "
                             "rerun sends them again") from None
        self._waiting.clear()

    async def run_flusher(self) -> None:
        """Write batches until cancelled: when `batch_rows` are waiting, or `flush_interval` after the first. The
        writes run on the event loop: a writer thread saved no work in total (benchmarks/instructions.sh)."""
        while True:
            if not self._waiting:
                self._first = anyio.Event()
                await self._first.wait()
            self._full = anyio.Event()
            if len(self._waiting) < self.batch_rows:
                with anyio.move_on_after(self.flush_interval):
                    await self._full.wait()
            self.flush()

    def close(self) -> None:
        """Write what is waiting, release the file and its lock."""
        try:
            self.flush()
        finally:
            try:
                self._db.close()
            finally:
                self._lock.release()
