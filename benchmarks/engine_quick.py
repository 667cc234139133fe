"""Quick engine throughput check: `tcia-async generate` next to a raw aiohttp + uvloop + orjson client.

Starts the simulator as a separate process (zero latency, no limits), writes N distinct chat requests, then runs,
alternating, the raw client and `generate` (fresh cache each time; cache and limiter on: --rpm/--tpm set far
above what the run reaches, so every request pays reservation, token counting and settlement) as subprocesses.
Reports requests/s measured inside each client (from its first request to its last result) and CPU
microseconds per request of the client process (user+sys, including start-up), and the ratio.

    python benchmarks/engine_quick.py [-n 20000] [-c 256] [--rounds 2]

The full harness with the other clients is bench.sh (another engineer's); this is for quick checks while
developing. Results go to stdout (and benchmarks/results/engine_quick.json with --save).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def write_requests(path: Path, n: int) -> None:
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [
                                       {"role": "user", "content": f"Quick benchmark request {i}: reply briefly."}]}}))
            fh.write(b"\n")


async def raw_client(base_url: str, inp: str, out: str, concurrency: int) -> dict:
    """The floor: one session, connector sized to the concurrency, C workers on one shared line iterator."""
    import aiohttp

    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    ok = 0
    with open(inp, "rb") as src, open(out, "wb", buffering=1 << 16) as dst:
        async with aiohttp.ClientSession(connector=conn, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def worker() -> None:
                nonlocal ok
                for line in src:
                    req = orjson.loads(line)
                    async with session.post(url, data=orjson.dumps(req["body"])) as resp:
                        data = await resp.read()
                        status = resp.status
                    body = orjson.loads(data)
                    dst.write(orjson.dumps({"id": "x", "custom_id": req["custom_id"],
                                            "response": {"status_code": status, "body": body}, "error": None}) + b"\n")
                    ok += status == 200

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            el = time.perf_counter() - t0
    return {"ok": ok, "elapsed_s": el}


def child_cpu(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("-c", "--concurrency", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--raw-child", nargs=4, metavar=("BASE", "IN", "OUT", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_child:
        import uvloop

        base, inp, out, c = args.raw_child
        print(json.dumps(uvloop.run(raw_client(base, inp, out, int(c)))))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="engine_quick_"))
    inp = tmp / "in.jsonl"
    write_requests(inp, args.n)
    sim = subprocess.Popen([PY, "-m", "tcia_async", "sim", "--port", "0"], stdout=subprocess.PIPE, text=True,
                           cwd=ROOT)
    try:
        line = sim.stdout.readline().strip()
        base = line.split()[-1]
        rows = []
        for r in range(args.rounds):
            proc, wall, cpu = child_cpu([PY, __file__, "--raw-child", base, str(inp), str(tmp / "raw.jsonl"),
                                         str(args.concurrency)])
            raw = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"client": "raw aiohttp+uvloop+orjson", "round": r, "req_s": args.n / raw["elapsed_s"],
                         "wall_s": wall, "cpu_us_per_req": cpu / args.n * 1e6})
            cache = tmp / f"gen{r}.cache.db"
            summary = tmp / "sum.json"
            argv = [PY, "-m", "tcia_async", "generate", str(inp), "-o", str(tmp / "gen.jsonl"), "--base-url", base,
                    "--concurrency", str(args.concurrency), "--rpm", "1000000000", "--tpm", "1000000000000",
                    "--cache", str(cache), "--quiet", "--summary-json", str(summary)]
            env_key = {"OPENAI_API_KEY": "sk-bench"}
            os.environ.update(env_key)
            proc, wall, cpu = child_cpu(argv)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            s = json.loads(summary.read_text())
            rows.append({"client": "tcia-async generate (cache+limiter)", "round": r,
                         "req_s": s["results_written"] / s["elapsed_s"], "wall_s": wall,
                         "cpu_us_per_req": cpu / args.n * 1e6, "ok": s["ok"]})
        for row in rows:
            print(f"{row['client']:40s} round {row['round']}: {row['req_s']:8,.0f} req/s  wall {row['wall_s']:.2f} s  "
                  f"CPU {row['cpu_us_per_req']:.0f} µs/request")
        raw_best = max(r["req_s"] for r in rows if r["client"].startswith("raw"))
        gen_best = max(r["req_s"] for r in rows if r["client"].startswith("tcia"))
        raw_cpu = min(r["cpu_us_per_req"] for r in rows if r["client"].startswith("raw"))
        gen_cpu = min(r["cpu_us_per_req"] for r in rows if r["client"].startswith("tcia"))
        print(f"ratio generate/raw (req/s, best of {args.rounds}): {gen_best / raw_best:.2f}; "
              f"CPU µs/request {gen_cpu:.0f} vs {raw_cpu:.0f}; sim stats: "
              f"{json.dumps({k: v for k, v in _stats(base).items() if k in ('requests', 'duplicates')})}")
        if args.save:
            out = ROOT / "benchmarks" / "results" / "engine_quick.json"
            out.write_text(json.dumps({"n": args.n, "concurrency": args.concurrency, "rows": rows,
                                       "ratio": gen_best / raw_best}, indent=2))
    finally:
        sim.terminate()
        sim.wait()
    return 0


def _stats(base: str) -> dict:
    import urllib.request

    root = base.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/sim/stats") as r:
        return json.loads(r.read())


if __name__ == "__main__":
    sys.exit(main())
