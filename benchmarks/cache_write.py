"""What the response cache costs per answer on the event loop, in one run, next to one alternative layout.

    python benchmarks/cache_write.py [--n 20000 100000] [--rounds 3]

For each N: N answers (about 350 bytes each, random 16-byte keys) go through what `generate` does with the cache:
a lookup of each chunk of 256 keys (all misses, as in a fresh run), `put` of each answer and a write of every 64
(the engine's batch at concurrency 256), then `close`. Then `replay`: the file reopened and every key looked up
again in chunks of 256 (all hits, as a rerun of a finished run).
- `cache`: tcia_async's ResponseCache (a rowid table with the key as its unique primary key);
- `without rowid`: the same rows in a WITHOUT ROWID table keyed by the key (one B-tree instead of two).
Reported: CPU microseconds per answer (user + system) of the best round, and replay answers per second.
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

from tcia_async.engine.cache import ResponseCache, sql_params  # noqa: E402

BODY = b'{"id":"chatcmpl-x","choices":[{"message":{"role":"assistant","content":"' + b"y" * 280 + b'"}}]}'
CHUNK = 256
BATCH = 64


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_cache(path: Path, keys: list[bytes]) -> tuple[float, float]:
    c = ResponseCache(path, batch_rows=BATCH)
    t0 = _cpu()
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        c.get_many(part)
        for k in part:
            c.put(k, BODY, "req_1")
            if len(c._waiting) >= BATCH:
                c.flush()
    c.close()
    write = _cpu() - t0
    c = ResponseCache(path)
    t0 = time.perf_counter()
    for i in range(0, len(keys), CHUNK):
        assert len(c.get_many(keys[i:i + CHUNK])) == len(keys[i:i + CHUNK])
    replay = time.perf_counter() - t0
    c.close()
    return write, replay


def run_without_rowid(path: Path, keys: list[bytes]) -> tuple[float, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE answers (key BLOB PRIMARY KEY, body BLOB NOT NULL, request_id TEXT NOT NULL, "
               "created REAL NOT NULL) WITHOUT ROWID")
    t0 = _cpu()
    rows = []
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        db.execute(f"SELECT key FROM answers WHERE key IN {sql_params(len(part))}", part).fetchall()
        for k in part:
            rows.append((k, BODY, "req_1", time.time()))
            if len(rows) >= BATCH:
                db.execute("BEGIN")
                db.executemany("INSERT OR IGNORE INTO answers VALUES (?,?,?,?)", rows)
                db.execute("COMMIT")
                rows = []
    if rows:
        db.executemany("INSERT OR IGNORE INTO answers VALUES (?,?,?,?)", rows)
    db.close()
    write = _cpu() - t0
    db = sqlite3.connect(path)
    t0 = time.perf_counter()
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        assert len(db.execute(f"SELECT key, body, request_id FROM answers WHERE key IN {sql_params(len(part))}",
                              part).fetchall()) == len(part)
    replay = time.perf_counter() - t0
    db.close()
    return write, replay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    out: dict[str, dict] = {}
    for n in args.n:
        keys = [os.urandom(16) for _ in range(n)]
        for name, fn in (("cache", run_cache), ("without rowid", run_without_rowid)):
            best_w, best_r = float("inf"), float("inf")
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as tmp:
                    w, r = fn(Path(tmp) / "c.db", keys)
                best_w, best_r = min(best_w, w), min(best_r, r)
            out.setdefault(str(n), {})[name] = {"write_us_per_answer": round(best_w / n * 1e6, 2),
                                               "replay_answers_per_s": round(n / best_r)}
            print(f"n={n:>7} {name:<14} write {best_w / n * 1e6:6.2f} µs/answer, replay {n / best_r:,.0f} answers/s",
                  file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
