"""A stand-in OpenAI-compatible chat server for developing the benchmark harness before `tcia-async sim` exists.

Not the project's simulator and not used when `tcia_async.sim.cli` is importable: `bench.sh` records which
server it ran against. It speaks the same start-up line and ledger as the simulator's contract
(`listening on http://127.0.0.1:PORT/v1`, `GET /sim/stats`, `POST /sim/reset`) and implements only what the
benchmarks need: fixed latency, RPM/RPS token buckets that start full and answer 429 with OpenAI's body and
`retry-after-ms`, and a ledger of requests by content hash.

    python benchmarks/devsim.py --port 0 [--latency-ms 0] [--rpm N] [--tpm N] [--rps N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time

import orjson
from aiohttp import web


class Bucket:
    """A token bucket of `capacity` refilled continuously at `rate` per second; it starts full."""

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.stamp = time.monotonic()

    def take(self, amount: float) -> float:
        """Take `amount` and return 0, or take nothing and return the seconds until it could be taken."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate


class DevSim:
    def __init__(self, latency_ms: float, rpm: float | None, tpm: float | None, rps: float | None) -> None:
        self.latency = latency_ms / 1000.0
        self.limits = (rpm, tpm, rps)
        self.reset()

    def reset(self) -> None:
        rpm, tpm, rps = self.limits
        self.buckets: list[tuple[str, Bucket]] = []
        if rpm:
            self.buckets.append(("requests", Bucket(rpm, rpm / 60.0)))
        if rps:
            self.buckets.append(("requests", Bucket(rps, rps)))
        if tpm:
            self.buckets.append(("tokens", Bucket(tpm, tpm / 60.0)))
        self.seen: set[bytes] = set()
        self.requests = 0
        self.ok = 0
        self.duplicates = 0
        self.by_status: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _count(self, status: int) -> None:
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1

    async def chat(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests += 1
        body = orjson.loads(raw)
        text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        prompt_tokens = max(1, len(text) // 4)
        max_tokens = int(body.get("max_tokens") or 16)
        for kind, bucket in self.buckets:
            wait = bucket.take(1 if kind == "requests" else prompt_tokens + max_tokens)
            if wait:
                self._count(429)
                err = {"error": {"message": f"Rate limit reached ({kind}). Please try again in {wait:.3f}s.",
                                 "type": kind, "param": None, "code": "rate_limit_exceeded"}}
                return web.Response(status=429, body=orjson.dumps(err), content_type="application/json",
                                    headers={"retry-after-ms": str(int(wait * 1000) + 1)})
        if self.latency:
            await asyncio.sleep(self.latency)
        digest = hashlib.sha256(raw).digest()
        if digest in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(digest)
        words = max(1, min(max_tokens, 12))
        answer = "[simulated] " + " ".join("ok" for _ in range(words))
        self.ok += 1
        self._count(200)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += words
        out = {
            "id": f"chatcmpl-dev{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "sim"),
            "system_fingerprint": "tcia-devsim",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": words,
                      "total_tokens": prompt_tokens + words},
        }
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        out = {"requests": self.requests, "by_status": self.by_status, "ok": self.ok, "unique": len(self.seen),
               "duplicates": self.duplicates,
               "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens}}
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def do_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b"{}", content_type="application/json")


async def serve(args: argparse.Namespace) -> None:
    sim = DevSim(args.latency_ms, args.rpm, args.tpm, args.rps)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_get("/sim/stats", sim.stats)
    app.router.add_post("/sim/reset", sim.do_reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
    await asyncio.Event().wait()  # serve until the process is terminated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--rpm", type=float)
    p.add_argument("--tpm", type=float)
    p.add_argument("--rps", type=float)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
