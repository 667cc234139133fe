"""`tcia-async generate`: an OpenAI Batch-format JSONL file in, one result line per input line out.

A thin shell over the engine (engine/runner.py). Settings come from flags, then the `[engine]` table of
`--config`, then $OPENAI_BASE_URL, then defaults, and are checked together (a bad value names its flag, variable
or file key). Every path is checked before anything is opened for writing: the input, the results, the cache
and the summary must be four different files. Results are written to `RESULTS.partial` and renamed into place
when the run finishes, so a refused, failed or interrupted run never damages a previous results file.

The cache defaults to RESULTS + ".cache.db": rerunning the same command after a crash, Ctrl-C or a stop replays
every answered request from it, sends only the rest, and writes RESULTS complete.

`--mode batch` sends the lines through the provider's Batch API instead (engine/batch.py): a first pass computes
every line's cache key exactly as the online pass does (runner.FileSource) and hands the lines to `run_batches`,
which answers them into the same cache; then the online results pass writes every line from the cache, and the
lines the batches could not answer as error results (nothing is sent online). The batch ids live in
RESULTS + ".batches/" (`--batch-dir`): a rerun reattaches to the batches in flight.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_STOPPED, EXIT_USAGE
from tcia_async.flows.common import (Interrupts, Staged, UsageError, batch_settings, by_kind, cache_files,
                                     check_paths, check_replaceable, engine_config, exit_for, is_results_file,
                                     json_with, missing_key, say)

EPILOG = """exit codes: 0 every line has its answer; 4 finished, but some lines ended in an error (the summary
counts them by kind; each has an error result); 2 usage, configuration or path error (nothing written);
3 stopped: quota, auth, or the provider failing on everything (for unreachable_after seconds, or a
request's attempts) (rerun to continue); 130 interrupted (rerun to continue)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("input", metavar="INPUT.jsonl", help="requests in the OpenAI Batch input format")
    p.add_argument("-o", "--output", metavar="RESULTS.jsonl", required=True,
                   help="results in the OpenAI Batch output format, one line per input line (written as "
                   "RESULTS.partial, renamed into place when the run finishes)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 "
                   "(default: config, then $OPENAI_BASE_URL, then https://api.openai.com/v1)")
    p.add_argument("--embedding-base-url", help="base URL for /v1/embeddings lines (default: --base-url)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key "
                   "(default OPENAI_API_KEY); the key is never written anywhere")
    p.add_argument("--concurrency", type=int, metavar="N", help="requests on the wire at most (default 256)")
    p.add_argument("--rpm", type=float, help="requests per minute limit (default: learned from the provider's "
                   "headers)")
    p.add_argument("--tpm", type=float, help="tokens per minute limit")
    p.add_argument("--rps", type=float, help="requests per second limit")
    p.add_argument("--tps", type=float, help="tokens per second limit")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts per request for transient failures "
                   "(default 8)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per attempt (default 600)")
    p.add_argument("--grace", type=float, metavar="S", help="after Ctrl-C, seconds to let requests in flight "
                   "finish (default 30)")
    p.add_argument("--cache", metavar="PATH", help="response cache (SQLite); default RESULTS.cache.db")
    p.add_argument("--no-cache", action="store_true", help="no cache: nothing is resumable")
    p.add_argument("--config", metavar="TOML", help="settings file with an [engine] table (limits, prices, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary on stderr (errors only)")
    p.add_argument("--summary-json", metavar="PATH", help="write the run summary as JSON to PATH")
    p.add_argument("--mode", choices=("online", "batch"), default="online",
                   help="online (default): requests as fast as the rate limits allow; batch: the provider's Batch "
                   "API (OpenAI: half price, answers within 24 h), same results and cache")
    p.add_argument("--batch-dir", metavar="DIR", help="batch mode: where batch files and ids are kept (default "
                   "RESULTS.batches); `tcia-async batches DIR` lists them")
    p.add_argument("--poll-interval", type=float, metavar="S", help="batch mode: seconds before the first status "
                   "check of a batch, growing after each (default 30; the [batch] table of --config holds the rest)")


def default_cache_path(output: str) -> str:
    return str(output) + ".cache.db"


_FLAGS = {"base_url": "--base-url", "embedding_base_url": "--embedding-base-url", "api_key_env": "--api-key-env",
          "concurrency": "--concurrency", "max_attempts": "--max-attempts", "timeout": "--timeout",
          "drain_timeout": "--grace", "limits.rpm": "--rpm", "limits.tpm": "--tpm", "limits.rps": "--rps",
          "limits.tps": "--tps"}


def build_config(args: argparse.Namespace, settings: Any) -> Any:
    """The EngineConfig from flags > --config [engine] (`settings`: the file read) > $OPENAI_BASE_URL > defaults
    (ConfigError when wrong)."""
    cfg = engine_config(args, settings, _FLAGS)
    if args.no_cache:
        cfg.cache_path = None
    elif args.cache:
        cfg.cache_path = args.cache
    elif not cfg.cache_path:
        cfg.cache_path = default_cache_path(args.output)
    return cfg


def default_batch_dir(output: str) -> str:
    return str(output) + ".batches"


def _err(msg: str) -> None:
    say("generate", msg)


class _State:
    SHOWN_BAD = 10  # bad input lines named on stderr; all of them are in the results file

    def __init__(self, output: str) -> None:
        self.output = output
        self.total: int | None = None
        self.started = time.perf_counter()
        self.bad = 0

    def report_bad(self, error: Any) -> None:
        self.bad += 1
        if self.bad <= self.SHOWN_BAD:
            _err(f"skipped {error.message}")
        elif self.bad == self.SHOWN_BAD + 1:
            _err(f"more bad input lines: each has an error result in {self.output} (code bad_input, "
                 "line_too_long or duplicate_custom_id)")


def _count_lines(path: str) -> int:
    n = 0
    last = b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
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


async def _main(args: argparse.Namespace, cfg: Any, state: _State, staged: Staged) -> dict[str, Any]:
    import anyio

    from tcia_async.engine import Engine
    from tcia_async.engine.runner import FileSink, FileSource, Run

    with_cost = bool(cfg.prices)
    tty = sys.stderr.isatty()
    async with Engine(cfg) as engine:
        sink = FileSink(staged.fh, on_bad=state.report_bad)
        run = Run(engine.requests, engine.embedding_entry, FileSource(engine.requests, args.input, sink), sink)

        def first() -> None:
            _err(f"interrupted: no new requests; {engine.stats.in_flight} on the wire get up to "
                 f"{cfg.drain_timeout:g} s to finish (Ctrl-C again to stop at once)")
            run.drain()
            engine.halt()  # requests waiting for budget or a retry are not sent now
            tg.start_soon(grace)

        def second() -> None:
            engine.cut()
            run.abandon()

        interrupts = Interrupts(first, second)

        async def grace() -> None:
            await anyio.sleep(cfg.drain_timeout)
            second()

        async def count_total() -> None:
            # Only a regular file can be read twice: a second reader of a pipe would take lines from the run.
            if Path(args.input).is_file():
                state.total = await anyio.to_thread.run_sync(_count_lines, args.input, abandon_on_cancel=True)

        async def progress() -> None:
            every = 0.5 if tty else 10.0
            while True:
                await anyio.sleep(every)  # a display refresh on a timer, not a wait for state
                text = _fmt_progress(engine, sink.written, state, with_cost)
                print("\r\x1b[2K" + text if tty else text, end="" if tty else "\n", file=sys.stderr, flush=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(interrupts.watch)
            tg.start_soon(count_total)
            if not args.quiet:
                tg.start_soon(progress)
            await run.run()
            tg.cancel_scope.cancel()
        staged.fh.flush()
        if not args.quiet and tty:
            print("\r\x1b[2K", end="", file=sys.stderr, flush=True)
    return _summary(args, cfg, state, staged, engine.stats, sink, run.source.lines, run.stopped,
                    interrupts.interrupted)


def _summary(args: argparse.Namespace, cfg: Any, state: _State, staged: Staged, stats: Any, sink: Any, lines: int,
             stopped: str | None, interrupted: bool) -> dict[str, Any]:
    elapsed = time.perf_counter() - state.started
    with_cost = bool(cfg.prices)
    if stopped:
        status = "stopped"
    elif interrupted:
        status = "interrupted"
    else:
        status = "complete" if sink.failed == 0 else "complete with errors"
    return {
        "status": status,
        "mode": args.mode,
        "input": str(args.input),
        "results": str(staged.final),
        "cache": cfg.cache_path,
        "lines": lines,
        "results_written": sink.written,
        "ok": sink.written - sink.failed,
        "failed": sink.failed,
        "failed_by_code": sink.by_code,
        "cached": stats.cached,
        "sent": stats.sent,
        "retries": stats.retries,
        "rate_limited": stats.rate_limited,
        "tokens": {"prompt": stats.prompt_tokens, "cached_prompt": stats.cached_tokens,
                   "completion": stats.completion_tokens, "total": stats.tokens},
        "cost_usd": round(stats.cost, 6) if with_cost else None,
        "elapsed_s": round(elapsed, 3),
        "req_per_s": round(sink.written / elapsed, 1) if elapsed > 0 else None,
        "stopped_reason": stopped,
    }


class _NoResults:
    """The sink of batch mode's key pass: bad lines get their results in the results pass, not here."""

    def bad(self, custom_id: Any, line: int, error: Any) -> None:
        pass


class _FromBatches:
    """The results pass of batch mode: the lines of a FileSource, each answered in the cache or failed in the
    batches. Failed and unanswered lines get their error result here, so the Run only replays from the cache and
    sends nothing online."""

    def __init__(self, source: Any, cache: Any, failures: dict[bytes, Any], sink: Any) -> None:
        self._source = source
        self._cache = cache
        self._failures = failures
        self._sink = sink

    @property
    def lines(self) -> int:
        return self._source.lines

    async def pump(self) -> None:
        await self._source.pump()

    def stop(self) -> None:
        self._source.stop()

    async def next_chunk(self) -> Any:
        from tcia_async.records import ErrorOut

        chunk = await self._source.next_chunk()
        if not chunk:
            return chunk
        hits = self._cache.get_many([it.key for it in chunk])
        answered = []
        for it in chunk:
            if it.key in hits:
                answered.append(it)
                continue
            error = self._failures.get(it.key) or ErrorOut(
                code="batch_unanswered", message="no batch answered this line; rerun to send it again")
            self._sink.fail(it, error)
        return answered

    def close(self) -> None:
        self._source.close()


async def _main_batch(args: argparse.Namespace, cfg: Any, settings: Any, state: _State, staged: Staged
                      ) -> dict[str, Any]:
    import anyio

    from tcia_async.engine import Engine, RunStopped
    from tcia_async.engine.batch import BatchItem, BatchRun
    from tcia_async.engine.runner import FileSink, FileSource, Run
    from tcia_async.flows.batches import progress_printer

    stopped: str | None = None
    async with Engine(cfg) as engine:
        batches = BatchRun(engine, args.batch_dir, settings, stage="generate",
                           on_progress=None if args.quiet else progress_printer(_err))
        sink = FileSink(staged.fh, on_bad=state.report_bad)
        run: Run | None = None
        waiting = anyio.CancelScope()

        def first() -> None:
            if run is not None:  # the results pass: a replay from the cache, ends at once
                run.drain()
                return
            _err("interrupted: no more uploads or status checks; the batches already created go on at the provider "
                 "(rerun the same command to collect them; Ctrl-C again to abandon a batch create on the wire)")
            waiting.cancel()

        def second() -> None:
            batches.cut()
            if run is not None:
                run.abandon()

        interrupts = Interrupts(first, second)
        keys = FileSource(engine.requests, args.input, _NoResults())

        async def items():
            while (chunk := await keys.next_chunk()) is not None:
                for it in chunk:
                    yield BatchItem(it.key, it.path, it.body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(interrupts.watch)
            try:
                with waiting:
                    outcome = await batches.run(items())
            except RunStopped as exc:
                stopped = exc.message
            finally:
                keys.close()
            if stopped is None and not interrupts.interrupted:
                source = _FromBatches(FileSource(engine.requests, args.input, sink), engine.cache,
                                      outcome.failures, sink)
                run = Run(engine.requests, engine.embedding_entry, source, sink)
                await run.run()
            tg.cancel_scope.cancel()
        staged.fh.flush()
        out = batches.outcome
        summary = _summary(args, cfg, state, staged, engine.stats, sink, keys.lines, stopped,
                           interrupts.interrupted)
        s = engine.stats
        summary["batch"] = {"dir": str(args.batch_dir), "batches": out.batches, "uploads": out.uploads,
                            "reattached": out.reattached, "lines_sent": out.sent, "answered": out.answered,
                            "resubmitted": out.resubmitted, "held_by_earlier_batches": out.held,
                            "unanswered": len(out.failures), "tokens": s.batch_tokens,
                            "cost_usd": round(s.batch_cost, 6) if cfg.prices else None,
                            "saved_usd": round(s.batch_saved, 6) if cfg.prices else None}
    return summary


_CODES = {"complete": EXIT_OK, "complete with errors": EXIT_SOME_FAILED, "stopped": EXIT_STOPPED,
          "interrupted": EXIT_INTERRUPTED}


def run_cli(args: argparse.Namespace) -> int:
    from tcia_async.config import ConfigError, read_settings
    from tcia_async.engine.batch import StateBusy

    settings = None
    try:
        toml = read_settings(args.config)
        cfg = build_config(args, toml)
        out = Path(args.output)
        writes: dict[str, Any] = {"--output": out, "the partial results (--output + .partial)":
                                  out.with_name(out.name + ".partial"), "--summary-json": args.summary_json}
        if cfg.cache_path:
            for i, f in enumerate(cache_files(cfg.cache_path)):
                writes["--cache" if i == 0 else f"the cache's {f.rsplit('.', 1)[-1]} file"] = f
        if args.mode == "batch":
            settings = batch_settings(args, toml)
            if not cfg.cache_path:
                raise UsageError("--mode batch needs the cache (its answers go there): drop --no-cache")
            if Path(args.input).exists() and not Path(args.input).is_file():
                raise UsageError(f"{args.input}: --mode batch reads INPUT twice (to send it, then to write the "
                                 "results): it must be a regular file, not a pipe or a device")
            args.batch_dir = args.batch_dir or default_batch_dir(args.output)
            _check_batch_dir(args.batch_dir, {"INPUT": args.input, "--config": args.config, **writes})
        elif args.batch_dir or args.poll_interval is not None:
            raise UsageError("--batch-dir and --poll-interval are for --mode batch")
        check_paths({"INPUT": args.input, "--config": args.config}, writes)
        for role in ("--output", "the partial results (--output + .partial)"):
            check_replaceable(writes[role], role, is_results_file, "a results file of tcia-async generate")
        check_replaceable(args.summary_json, "--summary-json", json_with("status", "results_written"),
                          "a summary of tcia-async generate")
    except (ConfigError, UsageError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    if (why := missing_key(cfg)) is not None:
        _err(why)
        return EXIT_USAGE

    from tcia_async.engine.tuning import tune_gc
    from tcia_async.flows.common import run_async

    tune_gc()
    state = _State(args.output)
    staged: Staged | None = None
    try:
        if cfg.cache_path:
            # Open (and lock) the cache before the results file is touched: a busy or broken cache must not cost
            # the previous results.
            from tcia_async.engine.cache import ResponseCache

            ResponseCache(cfg.cache_path).close()
        staged = Staged(out)
        if settings is not None:
            summary = run_async(_main_batch, args, cfg, settings, state, staged)
        else:
            summary = run_async(_main, args, cfg, state, staged)
    except KeyboardInterrupt:  # a Ctrl-C that arrived before the handler was installed
        _err("interrupted; rerun the same command to continue")
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure a user can reach becomes one line
        return exit_for(exc, (StateBusy,), _err)
    finally:
        if staged is not None:
            staged.close()
    code = _CODES[summary["status"]]
    summary["exit_code"] = code
    if code in (EXIT_OK, EXIT_SOME_FAILED):
        staged.commit()
    else:
        summary["results"] = str(staged.temp)
    if args.summary_json:
        import orjson

        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    if not args.quiet:
        _print_summary(summary)
    if code == EXIT_STOPPED:
        _err(f"stopped: {summary['stopped_reason']}. Everything answered is cached in {cfg.cache_path}; the results "
             f"so far are in {staged.temp}; fix the cause and rerun the same command to continue.")
    elif code == EXIT_INTERRUPTED:
        _err(f"interrupted after {summary['results_written']} results (in {staged.temp}; {args.output} is "
             f"unchanged). Answers are cached in {cfg.cache_path}: rerun the same command to resume (nothing "
             "answered is sent again).")
    elif code == EXIT_SOME_FAILED:
        _err(f"{summary['failed']} of {summary['results_written']} lines ended in an error "
             f"({by_kind(summary['failed_by_code'])}); each has an error result in {args.output}")
    if code in (EXIT_STOPPED, EXIT_INTERRUPTED) and settings is not None:
        _err(f"batches already created go on at the provider: the rerun collects them (`tcia-async batches "
             f"{args.batch_dir}` lists them, --cancel cancels them)")
    return code


def _check_batch_dir(batch_dir: str, others: dict[str, Any]) -> None:
    """The batch directory is a directory (or will be), and none of the command's files."""
    real = os.path.realpath(batch_dir)
    for role, path in others.items():
        if path is not None and os.path.realpath(path) == real:
            raise UsageError(f"--batch-dir and {role} are the same path ({batch_dir}); nothing was written")
    if os.path.exists(batch_dir) and not os.path.isdir(batch_dir):
        raise UsageError(f"{batch_dir}: exists and is not a directory (--batch-dir names a directory)")


def _print_summary(s: dict[str, Any]) -> None:
    cost = f", cost ${s['cost_usd']:.4f}" if s["cost_usd"] is not None else ""
    print(f"generate {s['status']}: {s['results_written']} results in {s['elapsed_s']:.2f} s "
          f"({s['req_per_s'] or 0:,.0f}/s) -> {s['results']}\n"
          f"  ok {s['ok']} (from cache {s['cached']}), failed {s['failed']}; sent {s['sent']} requests, "
          f"retries {s['retries']}, answered 429 {s['rate_limited']}; tokens {s['tokens']['total']:,}{cost}",
          file=sys.stderr, flush=True)
    b = s.get("batch")
    if b is not None:
        saved = f", ${b['cost_usd']:.4f} (saved ${b['saved_usd']:.4f})" if b["cost_usd"] is not None else ""
        print(f"  batch: {b['batches']} batches created, {b['reattached']} reattached; {b['lines_sent']} lines sent "
              f"({b['resubmitted']} resubmitted), {b['answered']} answered, {b['unanswered']} without an answer; "
              f"tokens {b['tokens']:,}{saved}; state in {b['dir']}", file=sys.stderr, flush=True)
