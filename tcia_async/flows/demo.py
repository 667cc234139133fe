"""`tcia-async demo`: the engine end to end against a local simulator, no API key and no network.

What it shows, in order: a run of `generate` over sample requests (chat and embeddings, written from the shipped
corpus) under a rate limit, interrupted half way as a crash would; the rerun that completes it, sending only what
was never answered; a third run that replays everything from the cache; the simulator's ledger (requests it
answered twice: the number of paid calls a resume repeated); and a query of the shipped task database.

The simulator is started by the CLI layer (flows do not import it) and handed over as `args.start_simulator`.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from tcia_async.io import JsonlWriter, Line, iter_jsonl

DEMO_MODEL = "gpt-4.1-mini"
DEMO_EMBEDDING_MODEL = "text-embedding-3-small"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-run", help="directory for the demo's files (default ./demo-run)")
    p.add_argument("--requests", type=int, default=2000, metavar="N",
                   help="chat requests to send (default 2000; a tenth as many embeddings lines come on top)")
    p.add_argument("--rpm", type=int, default=30000,
                   help="the simulated provider's requests-per-minute limit (default 30000)")
    p.add_argument("--latency-ms", type=float, default=80.0, help="simulated latency per request (default 80)")
    p.add_argument("--concurrency", type=int, default=128, help="requests in flight (default 128)")
    p.add_argument("--quiet", action="store_true", help="only the final lines")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _corpus_instructions() -> list[str]:
    path = resources.files("tcia_async") / "data" / "corpus.jsonl"
    with resources.as_file(path) as p:
        return [item.value["instruction"] for item in iter_jsonl(p) if isinstance(item, Line)]


def write_requests(path: Path, n: int) -> int:
    """Sample Batch-format requests: n chat lines over the shipped corpus, plus n/10 embeddings lines."""
    texts = _corpus_instructions()
    count = 0
    with JsonlWriter(path) as out:
        for i in range(n):
            text = texts[i % len(texts)]
            out.write({
                "custom_id": f"chat-{i:06d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": DEMO_MODEL,
                    "messages": [{"role": "user", "content": f"{text} (variant {i // len(texts)})"}],
                    "max_tokens": 48,
                },
            })
            count += 1
        for i in range(n // 10):
            out.write({
                "custom_id": f"emb-{i:06d}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": DEMO_EMBEDDING_MODEL, "input": texts[i % len(texts)]},
            })
            count += 1
    return count


def _generate_args(args: argparse.Namespace, base_url: str, inp: Path, out: Path,
                   summary: Path) -> argparse.Namespace:
    from tcia_async.flows import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    argv = [str(inp), "-o", str(out), "--base-url", base_url, "--concurrency", str(args.concurrency),
            "--rpm", str(args.rpm), "--summary-json", str(summary), "--cache", str(inp.parent / "cache.db")]
    if args.quiet:
        argv.append("--quiet")
    return parser.parse_args(argv)


def _load(path: Path) -> dict[str, Any]:
    return orjson.loads(path.read_bytes())


def run(args: argparse.Namespace) -> int:
    from tcia_async.flows import generate, taskdb

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("cache.db", "cache.db-wal", "cache.db-shm"):
        (out_dir / stale).unlink(missing_ok=True)  # a demo starts from nothing, so its figures mean something
    requests = out_dir / "requests.jsonl"
    total = write_requests(requests, args.requests)
    _say(f"demo: {total} sample requests in {requests} (the OpenAI Batch input format)")

    with args.start_simulator(latency_ms=args.latency_ms, jitter_ms=args.latency_ms / 4, rpm=args.rpm) as sim:
        _say(f"demo: simulated provider at {sim.base_url} (latency {args.latency_ms:.0f} ms, RPM {args.rpm})")

        # 1. A first run that dies half way: the first half of the file only, as if the process were killed.
        half = out_dir / "requests-first-half.jsonl"
        lines = requests.read_bytes().splitlines(keepends=True)
        half.write_bytes(b"".join(lines[: len(lines) // 2]))
        _say("demo: run 1 — sending the first half, then stopping as a crash would")
        generate.run_cli(_generate_args(args, sim.base_url, half, out_dir / "results-partial.jsonl",
                                        out_dir / "summary-1.json"))
        paid_before = sim.stats()["ok"]

        # 2. The rerun over the whole file: answered requests replay from the cache, only the rest is sent.
        _say("demo: run 2 — the full file; what run 1 answered comes from the cache")
        t0 = time.perf_counter()
        code = generate.run_cli(_generate_args(args, sim.base_url, requests, out_dir / "results.jsonl",
                                               out_dir / "summary-2.json"))
        t_run2 = time.perf_counter() - t0
        if code != 0:
            _say(f"demo: generate exited {code}")
            return code

        # 3. Once more: everything is cached, nothing is paid.
        _say("demo: run 3 — the same command again: a pure replay")
        generate.run_cli(_generate_args(args, sim.base_url, requests, out_dir / "results.jsonl",
                                        out_dir / "summary-3.json"))
        stats = sim.stats()

    s2, s3 = _load(out_dir / "summary-2.json"), _load(out_dir / "summary-3.json")
    print(f"""
demo results (simulated provider; {total} requests)
  run 1 (first half, then 'crash'): {paid_before} answered and cached
  run 2 (full file):                {s2['sent']} API calls (embeddings packed), {s2['cached']} from cache, \
in {t_run2:.1f} s; answered 429: {s2['rate_limited']}
  run 3 (rerun):                    {s3['sent']} API calls, {s3['cached']} from cache, {s3['req_per_s'] or 0:,.0f} results/s
  simulator ledger:                 {stats['ok']} paid answers for {stats['unique']} distinct requests, \
{stats['duplicates']} paid twice
  results: {out_dir / 'results.jsonl'}""", flush=True)

    db_dir = resources.files("tcia_async") / "data" / "taskdb"
    if db_dir.is_dir():
        print("\ntask database shipped with the package: nearest task types to 'summarise a meeting transcript'",
              flush=True)
        parser = argparse.ArgumentParser()
        taskdb.add_arguments(parser)
        with resources.as_file(db_dir) as db_path:
            q = parser.parse_args(["query", str(db_path), "summarise a meeting transcript", "-k", "3"])
            q.start_simulator = args.start_simulator
            taskdb.run_query(q)
    return 0
