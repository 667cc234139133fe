"""What the response cache costs per answer, next to the layouts it replaced, in one run.

    python benchmarks/cache_write.py [--n 20000 100000] [--rounds 3]

For each N: N answers (about 350 bytes each, random 16-byte keys) go through what `generate` does with the cache
on its event loop: a lookup of each chunk of 256 keys (all misses, as in a fresh run), `put` of each answer
(batches of 64, as at concurrency 256) and `close`. Then `replay`: the file reopened and every key looked up again
in chunks of 256 (all hits, in the order written, as a rerun of a finished run).
- `cache`: tcia_async's ResponseCache (format 4: one row per batch, keys indexed in sorted passes);
- `row per answer`: format 3, the layout it replaced: a row per answer appended without an index (executemany per
  batch), indexed in sorted passes of 4,096 rows by SQL (INSERT INTO lookup SELECT ... ORDER BY h);
- `indexed table`: format 2, the same rows into a table indexed on the key's first 8 bytes.
Reported: CPU microseconds per answer (user + system, os.times) of the best round. All write to the same disk. No
flusher task runs here, so SQLite's own checkpoints (every 1,000 pages) run inside the commits for all three,
where the engine runs them on a worker thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcia_async.engine.cache import ResponseCache  # noqa: E402

BODY = b'{"id":"chatcmpl-x","choices":[{"message":{"role":"assistant","content":"' + b"y" * 280 + b'"}}]}'
CHUNK = 256
BATCH = 64
MERGE = 4096
NAMES = ("cache", "row per answer", "indexed table")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _h(k: bytes) -> int:
    return int.from_bytes(k[:8], "little", signed=True)


def run_cache(path: Path, keys: list[bytes]) -> tuple[float, float]:
    c = ResponseCache(path, batch_rows=BATCH)
    t0 = _cpu()
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        c.get_many(part)
        for k in part:
            c.put(k, BODY, "req_1")
    c.close()
    write = _cpu() - t0
    c = ResponseCache(path)
    t0 = _cpu()
    hits = sum(len(c.get_many(keys[i:i + CHUNK])) for i in range(0, len(keys), CHUNK))
    replay = _cpu() - t0
    c.close()
    assert hits == len(keys)
    return write, replay


class _Rows:
    """A row per answer: format 3 (`merge=True`: no index, sorted passes into `lookup`) or format 2 (an index on
    `h`, kept by every insert)."""

    def __init__(self, path: Path, merge: bool) -> None:
        self.db = db = sqlite3.connect(str(path), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self.merge = merge
        if merge:
            self.by_h = "SELECT r.key, r.body, r.request_id FROM lookup l JOIN responses r ON r.id = l.id WHERE l.h "
        else:
            self.by_h = "SELECT key, body, request_id FROM responses WHERE h "
        self.indexed = 0

    def create(self) -> None:
        self.db.execute("CREATE TABLE responses (id INTEGER PRIMARY KEY, h INTEGER NOT NULL, key BLOB NOT NULL, "
                        "body BLOB NOT NULL, request_id TEXT NOT NULL DEFAULT '', created REAL NOT NULL)")
        if self.merge:
            self.db.execute("CREATE TABLE lookup (h INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (h, id)) "
                            "WITHOUT ROWID")
        else:
            self.db.execute("CREATE INDEX responses_h ON responses(h)")

    def get_many(self, part: list[bytes]) -> dict[bytes, tuple[bytes, str]]:
        wanted = set(part)
        q = self.by_h + "IN (" + ",".join("?" * len(part)) + ")"
        return {k: (b, r) for k, b, r in self.db.execute(q, [_h(k) for k in part]) if k in wanted}

    def write(self, rows: list[tuple]) -> None:
        db = self.db
        db.execute("BEGIN")
        db.executemany("INSERT INTO responses (h, key, body, request_id, created) VALUES (?,?,?,?,?)", rows)
        db.execute("COMMIT")
        if self.merge:
            last = db.execute("SELECT max(id) FROM responses").fetchone()[0]
            if last - self.indexed >= MERGE:
                self.merge_pass(last)

    def merge_pass(self, last: int) -> None:
        self.db.execute("BEGIN")
        self.db.execute("INSERT OR IGNORE INTO lookup (h, id) SELECT h, id FROM responses WHERE id > ? ORDER BY h",
                        (self.indexed,))
        self.db.execute("COMMIT")
        self.indexed = last

    def close(self) -> None:
        if self.merge:
            self.merge_pass(self.db.execute("SELECT max(id) FROM responses").fetchone()[0])
        self.db.close()


def _run_rows(path: Path, keys: list[bytes], merge: bool) -> tuple[float, float]:
    c = _Rows(path, merge)
    c.create()
    pending: list[tuple] = []
    t0 = _cpu()
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        c.get_many(part)
        for k in part:
            pending.append((_h(k), k, BODY, "req_1", time.time()))
            if len(pending) >= BATCH:
                c.write(pending)
                pending = []
    if pending:
        c.write(pending)
    c.close()
    write = _cpu() - t0
    c = _Rows(path, merge)
    t0 = _cpu()
    hits = sum(len(c.get_many(keys[i:i + CHUNK])) for i in range(0, len(keys), CHUNK))
    replay = _cpu() - t0
    c.db.close()
    assert hits == len(keys)
    return write, replay


def run_row_per_answer(path: Path, keys: list[bytes]) -> tuple[float, float]:
    return _run_rows(path, keys, merge=True)


def run_indexed_table(path: Path, keys: list[bytes]) -> tuple[float, float]:
    return _run_rows(path, keys, merge=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    out = {}
    runs = dict(zip(NAMES, (run_cache, run_row_per_answer, run_indexed_table)))
    for n in args.n:
        keys = [os.urandom(16) for _ in range(n)]
        best = {name: [float("inf"), float("inf")] for name in NAMES}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                with tempfile.TemporaryDirectory() as d:
                    write, replay = fn(Path(d) / "c.db", keys)
                best[name] = [min(best[name][0], write), min(best[name][1], replay)]
        row = {name: {"write": round(w / n * 1e6, 2), "replay": round(r / n * 1e6, 2)}
               for name, (w, r) in best.items()}
        out[n] = row
        print(f"N={n:>7,}: " + ", ".join(f"{name} {v['write']} us/answer (replay {v['replay']})"
                                         for name, v in row.items()), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
