"""What the response cache costs per answer, next to the layout it replaced, in one run.

    python benchmarks/cache_write.py [--n 20000 100000] [--rounds 3]

For each N: N answers (about 350 bytes each, random 16-byte keys) go through what `generate` does with the cache
on its event loop: a lookup of each chunk of 256 keys (all misses, as in a fresh run), `put` of each answer
(batches of 64, as at concurrency 256) and `close`.
- `cache`: tcia_async's ResponseCache (format 3: rows appended without an index, keys indexed in sorted passes);
- `indexed table`: the format-2 layout it replaced, the same rows and batches into a table indexed on the key's
  first 8 bytes (executemany per batch), with the same lookups.
Reported: CPU microseconds per answer (user + system, os.times) of the best round. Both write to the same disk.
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


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_cache(path: Path, keys: list[bytes]) -> float:
    c = ResponseCache(path, batch_rows=BATCH)
    t0 = _cpu()
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        c.get_many(part)
        for k in part:
            c.put(k, BODY, "req_1")
    c.close()
    return _cpu() - t0


def run_indexed_table(path: Path, keys: list[bytes]) -> float:
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript("CREATE TABLE responses (id INTEGER PRIMARY KEY, h INTEGER NOT NULL, key BLOB NOT NULL, "
                     "body BLOB NOT NULL, request_id TEXT NOT NULL DEFAULT '', created REAL NOT NULL); "
                     "CREATE INDEX responses_h ON responses(h);")
    h = lambda k: int.from_bytes(k[:8], "little", signed=True)  # noqa: E731
    pending: list[tuple] = []
    t0 = _cpu()
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        q = "SELECT key, body, request_id FROM responses WHERE h IN (%s)" % ",".join("?" * len(part))
        db.execute(q, [h(k) for k in part]).fetchall()
        for k in part:
            pending.append((h(k), k, BODY, "req_1", time.time()))
            if len(pending) >= BATCH:
                db.execute("BEGIN")
                db.executemany("INSERT INTO responses (h, key, body, request_id, created) VALUES (?,?,?,?,?)",
                               pending)
                db.execute("COMMIT")
                pending.clear()
    if pending:
        db.execute("BEGIN")
        db.executemany("INSERT INTO responses (h, key, body, request_id, created) VALUES (?,?,?,?,?)", pending)
        db.execute("COMMIT")
    db.close()
    return _cpu() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    out = {}
    for n in args.n:
        keys = [os.urandom(16) for _ in range(n)]
        best = {"cache": float("inf"), "indexed table": float("inf")}
        for _ in range(args.rounds):
            for name, fn in (("cache", run_cache), ("indexed table", run_indexed_table)):
                with tempfile.TemporaryDirectory() as d:
                    best[name] = min(best[name], fn(Path(d) / "c.db", keys))
        row = {name: round(v / n * 1e6, 2) for name, v in best.items()}
        out[n] = row
        print(f"N={n:>7,}: cache {row['cache']} us/answer, indexed table {row['indexed table']} us/answer "
              f"({row['indexed table'] / row['cache']:.2f}x)", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
