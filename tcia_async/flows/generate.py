"""`tcia-async generate`: an OpenAI Batch-format JSONL file in, one result line per custom_id out.

A thin shell over the engine (tcia_async.engine.runner). Settings come from flags, then the `[engine]` table of
`--config`, then OPENAI_BASE_URL, then defaults. The cache defaults to RESULTS + ".cache.db" next to the results:
rerunning the same command after a crash, Ctrl-C or a quota stop replays every answered request from it and sends
only the rest, and rewrites RESULTS complete.

Exit codes: 0 every line has its result (answers or classified errors); 2 usage or configuration error;
3 stopped early on quota/auth (rerun to continue); 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT.jsonl", help="requests in the OpenAI Batch input format")
    p.add_argument("-o", "--output", metavar="RESULTS.jsonl", required=True,
                   help="results in the OpenAI Batch output format (rewritten on every run)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 "
                   "(default: config, then $OPENAI_BASE_URL, then https://api.openai.com/v1)")
    p.add_argument("--embedding-base-url", help="base URL for /v1/embeddings lines (default: --base-url)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key "
                   "(default OPENAI_API_KEY); the key is never written anywhere")
    p.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at most (default 256)")
    p.add_argument("--rpm", type=float, help="requests per minute limit (default: learned from the provider's headers)")
    p.add_argument("--tpm", type=float, help="tokens per minute limit")
    p.add_argument("--rps", type=float, help="requests per second limit")
    p.add_argument("--tps", type=float, help="tokens per second limit")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts per request for transient failures (default 8)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per attempt (default 600)")
    p.add_argument("--grace", type=float, metavar="S", help="after Ctrl-C, seconds to let requests in flight finish "
                   "(default 30)")
    p.add_argument("--cache", metavar="PATH", help="response cache (SQLite); default RESULTS.cache.db")
    p.add_argument("--no-cache", action="store_true", help="no cache: nothing is resumable")
    p.add_argument("--config", metavar="TOML", help="settings file with an [engine] table (limits, prices, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary on stderr (errors only)")
    p.add_argument("--summary-json", metavar="PATH", help="write the run summary as JSON to PATH")


def default_cache_path(output: str) -> str:
    return str(output) + ".cache.db"


def build_config(args: argparse.Namespace) -> Any:
    """The EngineConfig from flags > --config [engine] > $OPENAI_BASE_URL > defaults (ConfigError when wrong)."""
    from tcia_async.config import ConfigError, Limits, load_engine_config, load_toml

    file_engine: dict[str, Any] = {}
    if args.config:
        file_engine = load_toml(args.config).get("engine", {}) or {}
    overrides: dict[str, Any] = {
        "base_url": args.base_url,
        "embedding_base_url": args.embedding_base_url,
        "api_key_env": args.api_key_env,
        "concurrency": args.concurrency,
        "max_attempts": args.max_attempts,
        "timeout": args.timeout,
        "drain_timeout": args.grace,
    }
    if args.base_url is None and "base_url" not in file_engine and os.environ.get("OPENAI_BASE_URL"):
        overrides["base_url"] = os.environ["OPENAI_BASE_URL"]
    cfg = load_engine_config(args.config, **overrides)
    limits = Limits(rpm=cfg.limits.rpm, tpm=cfg.limits.tpm, rps=cfg.limits.rps, tps=cfg.limits.tps)
    for name in ("rpm", "tpm", "rps", "tps"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{name} must be positive")
            setattr(limits, name, value)
    cfg.limits = limits
    if args.no_cache:
        cfg.cache_path = None
    elif args.cache:
        cfg.cache_path = args.cache
    elif not cfg.cache_path:
        cfg.cache_path = default_cache_path(args.output)
    if cfg.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if cfg.max_attempts < 1:
        raise ConfigError("--max-attempts must be at least 1")
    if cfg.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    if not cfg.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base URL {cfg.base_url!r} must start with http:// or https://")
    return cfg


def _err(msg: str) -> None:
    print(f"tcia-async generate: {msg}", file=sys.stderr, flush=True)


class _State:
    SHOWN_BAD = 10  # bad input lines named on stderr; all of them are in RESULTS

    def __init__(self) -> None:
        self.interrupted = False
        self.hard = False
        self.total: int | None = None
        self.started = time.perf_counter()
        self.bad = 0

    def report_bad(self, error: Any) -> None:
        self.bad += 1
        if self.bad <= self.SHOWN_BAD:
            _err(f"skipped {error.message}")
        elif self.bad == self.SHOWN_BAD + 1:
            _err("more bad input lines: each has an error result in RESULTS (code bad_input or duplicate_custom_id)")


def _count_lines(path: str) -> int:
    n = 0
    last = b"\n"
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (0 if last == b"\n" else 1)


def _fmt_progress(engine: Any, written: int, state: _State, with_cost: bool) -> str:
    s = engine.stats
    el = max(1e-9, time.perf_counter() - state.started)
    total = f"/{state.total}" if state.total is not None else ""
    line = (f"{written}{total} done  {written / el:,.0f} req/s  {s.tokens * 60 / el:,.0f} tok/min  "
            f"cached {s.cached}  failed {s.failed}  retries {s.retries}  429s {s.rate_limited}")
    if with_cost:
        line += f"  ${s.cost:.4f}"
    return line


async def _main(args: argparse.Namespace, cfg: Any, state: _State) -> dict[str, Any]:
    import signal

    import anyio

    from tcia_async.engine import Engine
    from tcia_async.engine.runner import FileSink, FileSource, Run

    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with_cost = bool(cfg.prices)
    tty = sys.stderr.isatty()
    async with Engine(cfg) as engine:
        with open(out_path, "wb", buffering=1 << 16) as fh:
            sink = FileSink(fh, on_bad=state.report_bad)
            run = Run(engine, FileSource(engine, args.input, sink), sink)

            async def count_total() -> None:
                state.total = await anyio.to_thread.run_sync(_count_lines, args.input, abandon_on_cancel=True)

            async def grace() -> None:
                await anyio.sleep(cfg.drain_timeout)
                run.abandon()

            async def watch_signals(tg: Any) -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        if not state.interrupted:
                            state.interrupted = True
                            _err(f"interrupted: no new requests; {run.in_flight} in flight get up to "
                                 f"{cfg.drain_timeout:g} s to finish (Ctrl-C again to stop at once)")
                            run.drain()
                            engine.halt()  # requests waiting for budget or a retry are not sent now
                            tg.start_soon(grace)
                        else:
                            state.hard = True
                            run.abandon()

            async def progress() -> None:
                every = 0.5 if tty else 10.0
                while True:
                    await anyio.sleep(every)  # a display refresh on a timer, not a wait for state
                    text = _fmt_progress(engine, sink.written, state, with_cost)
                    if tty:
                        print("\r\x1b[2K" + text, end="", file=sys.stderr, flush=True)
                    else:
                        print(text, file=sys.stderr, flush=True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_signals, tg)
                tg.start_soon(count_total)
                if not args.quiet:
                    tg.start_soon(progress)
                await run.run()
                tg.cancel_scope.cancel()
            fh.flush()
            if not args.quiet and tty:
                print("\r\x1b[2K", end="", file=sys.stderr, flush=True)
        stats = engine.stats
        elapsed = time.perf_counter() - state.started
        status = "stopped" if run.stopped else ("interrupted" if state.interrupted else "complete")
        return {
            "status": status,
            "input": str(args.input),
            "results": str(out_path),
            "cache": cfg.cache_path,
            "lines": source_lines(run),
            "results_written": sink.written,
            "ok": stats.ok,
            "failed": stats.failed,
            "cached": stats.cached,
            "sent": stats.sent,
            "retries": stats.retries,
            "rate_limited": stats.rate_limited,
            "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens, "total": stats.tokens},
            "cost_usd": round(stats.cost, 6) if with_cost else None,
            "elapsed_s": round(elapsed, 3),
            "req_per_s": round(sink.written / elapsed, 1) if elapsed > 0 else None,
            "stopped_reason": run.stopped,
        }


def source_lines(run: Any) -> int:
    return run.source.lines


def run_cli(args: argparse.Namespace) -> int:
    from tcia_async.config import ConfigError

    try:
        cfg = build_config(args)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not os.path.isfile(args.input):
        _err(f"{args.input}: no such file")
        return EXIT_USAGE
    from tcia_async.engine.client import is_loopback

    if not cfg.api_key() and not is_loopback(cfg.base_url):
        _err(f"no API key: set ${cfg.api_key_env} (or name another variable with --api-key-env)")
        return EXIT_USAGE

    import anyio

    from tcia_async.engine.cache import CacheError
    from tcia_async.engine.tuning import event_loop_options, tune_gc

    tune_gc()
    state = _State()
    try:
        summary = anyio.run(_main, args, cfg, state, backend="asyncio", backend_options=event_loop_options())
    except CacheError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:  # a Ctrl-C that arrived before the handler was installed
        _err("interrupted; rerun the same command to continue")
        return EXIT_INTERRUPTED
    code = {"complete": EXIT_OK, "stopped": EXIT_STOPPED, "interrupted": EXIT_INTERRUPTED}[summary["status"]]
    summary["exit_code"] = code
    if args.summary_json:
        import orjson

        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    if not args.quiet:
        _print_summary(summary)
    if summary["status"] == "stopped":
        _err(f"stopped: {summary['stopped_reason']}. Everything answered is cached in {cfg.cache_path}; "
             "fix the cause and rerun the same command to continue.")
    elif summary["status"] == "interrupted":
        _err(f"interrupted after {summary['results_written']} results. Answers are cached in {cfg.cache_path}; "
             "rerun the same command to resume (nothing answered is sent again).")
    return code


def _print_summary(s: dict[str, Any]) -> None:
    cost = f", cost ${s['cost_usd']:.4f}" if s["cost_usd"] is not None else ""
    print(f"generate {s['status']}: {s['results_written']} results in {s['elapsed_s']:.2f} s "
          f"({s['req_per_s'] or 0:,.0f}/s) -> {s['results']}\n"
          f"  ok {s['ok']} (from cache {s['cached']}), failed {s['failed']}; sent {s['sent']} requests, "
          f"retries {s['retries']}, answered 429 {s['rate_limited']}; tokens {s['tokens']['total']:,}{cost}",
          file=sys.stderr, flush=True)
