"""Is the simulator as fast as a minimal aiohttp handler? Both servers run in their own process (uvloop when
installed), one at a time, driven by the same raw aiohttp client (concurrency C, N chat requests each run).

Reports per server: requests/s (median over rounds, servers alternating) and the server process's CPU µs per
request (user+system from /proc, so it measures the server, not the client).

    python benchmarks/sim_speed.py [-n 20000] [-c 256] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import aiohttp
import orjson

# The fixed answer the minimal handler sends: a chat completion of the same shape and size as the simulator's.
_FIXED = orjson.dumps({
    "id": "chatcmpl-fixed", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "system_fingerprint": "fixed",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "[simulated] " + "word " * 40,
                                         "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 44, "total_tokens": 64},
})


def _new_loop_factory():
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return None


def serve_minimal() -> None:
    """A minimal aiohttp.web app: one route, read the body, answer a fixed JSON, no access log."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=_FIXED, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=_new_loop_factory()) as r:
        r.run(main())


def _start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"{cmd} did not start: {line!r}")
    return proc, line.split()[-1]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(base_url: str, n: int, concurrency: int) -> float:
    url = base_url + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    next_i = 0
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                body = orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 64,
                                     "messages": [{"role": "user", "content": f"Request number {i}: say hi."}]})
                async with session.post(url, data=body, headers=headers) as r:
                    data = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}: {data[:200]!r}")
                    orjson.loads(data)

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
        return time.perf_counter() - t0


def _measure(cmd: list[str], n: int, c: int) -> tuple[float, float]:
    proc, base_url = _start(cmd)
    try:
        with asyncio.Runner(loop_factory=_new_loop_factory()) as r:
            r.run(_drive(base_url, min(n, 2000), c))  # warm-up: connections, caches, first-call costs
            cpu0 = _cpu_s(proc.pid)
            wall = r.run(_drive(base_url, n, c))
            cpu = _cpu_s(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
    return n / wall, cpu / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=20_000, help="requests per measured run (default 20000)")
    p.add_argument("-c", type=int, default=256, help="client concurrency (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per server (default 3)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--serve-minimal", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_minimal:
        serve_minimal()
        return 0
    servers = {
        "minimal_aiohttp": [sys.executable, __file__, "--serve-minimal"],
        "simulator": [sys.executable, "-m", "tcia_async.sim", "--port", "0"],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in servers}
    for _ in range(a.rounds):
        for name, cmd in servers.items():
            results[name].append(_measure(cmd, a.n, a.c))
    out = {"n": a.n, "concurrency": a.c, "rounds": a.rounds, "cores": os.cpu_count(),
           "python": sys.version.split()[0], "aiohttp": aiohttp.__version__}
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        out[name] = {"rps": round(rps), "server_cpu_us": round(cpu, 1), "runs_rps": [round(r) for r, _ in runs]}
        print(f"{name:16s} {rps:9.0f} req/s   server CPU {cpu:6.1f} µs/request   runs {out[name]['runs_rps']}")
    ratio = out["simulator"]["rps"] / out["minimal_aiohttp"]["rps"]
    out["ratio_rps"] = round(ratio, 3)
    print(f"simulator / minimal aiohttp: {ratio:.3f} (req/s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
