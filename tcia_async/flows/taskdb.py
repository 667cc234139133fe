"""The task-database flow: corpus -> decompose -> embed -> cluster and index (`tcia-async db build|query|stats`).

`db build` streams the corpus: a bounded pool of workers decomposes one instruction each through the engine
(one cached structured-output call per line), the records land in `DBDIR/records.jsonl` as they complete, and
only the unique task types and constraints stay in memory. Then the unique strings are embedded in sorted order
(packed embedding calls) and `retrieval.TaskDB` clusters and indexes them. Rerunning the same command after a
kill replays every answered call from the engine's cache (by default `DBDIR/cache.db`) and sends only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from tcia_async.io import BadLine, JsonlWriter, iter_jsonl
from tcia_async.records import Decomposition

DEFAULT_MODEL = "gpt-4.1"
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _cosine_eps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 2.0:
        raise argparse.ArgumentTypeError(f"{value} is not a cosine distance in (0, 2]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION")

    b = sub.add_parser(
        "build", help="decompose a corpus, cluster its task types, index types and constraints",
        description="Build a task database from a corpus of instructions: JSONL with `instruction`, `prompt` or "
        "chat `messages` (first user turn), or Parquet with the same columns (needs pyarrow). Every answered "
        "call is cached; rerun the same command to resume after a crash or Ctrl-C.",
    )
    b.set_defaults(handler="tcia_async.flows.taskdb:run_build")
    b.add_argument("corpus", help="JSONL or Parquet file of instructions")
    b.add_argument("--out", required=True, help="database directory to write")
    _engine_flags(b)
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"decomposition model (default {DEFAULT_MODEL})")
    b.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL,
                   help=f"embedding model (default {DEFAULT_EMBEDDING_MODEL})")
    b.add_argument("--mode", choices=("online", "batch"), default="online",
                   help="online: requests as fast as the rate limits allow; batch: the provider's Batch API")
    b.add_argument("--concurrency", type=_positive_int, default=64, help="requests in flight (default 64)")
    b.add_argument("--cache", default=None, help="response cache (default DBDIR/cache.db)")
    b.add_argument("--eps", type=_cosine_eps, default=None,
                   help="DBSCAN radius on cosine distance for task-type clustering (default 0.15)")
    b.add_argument("--min-samples", type=_positive_int, default=None, help="DBSCAN min_samples, the point included (default 2)")
    b.add_argument("--limit", type=int, default=None, help="use only the first N usable corpus lines")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")

    q = sub.add_parser(
        "query", help="nearest task-type clusters (with sample constraints), or nearest constraints",
        description="Embed the text with the database's embedding model and print its nearest task-type "
        "clusters, or with --constraint its nearest constraints. A database built with the simulator is "
        "queried through an in-process simulator when no URL is given.",
    )
    q.set_defaults(handler="tcia_async.flows.taskdb:run_query")
    q.add_argument("db", help="database directory")
    q.add_argument("text", nargs="?", help="a task type or task description")
    q.add_argument("--constraint", default=None, help="find constraints nearest to this text instead")
    q.add_argument("-k", type=_positive_int, default=5, help="how many results (default 5)")
    q.add_argument("--samples", type=int, default=3, help="sample constraints shown per cluster (default 3)")
    q.add_argument("--embedding-model", default=None, help="must match the database's (default: the database's)")
    q.add_argument("--json", action="store_true", help="print JSON")
    _engine_flags(q, required=False)

    s = sub.add_parser("stats", help="corpus statistics of a database (the paper's)",
                       description="Task types by number of queries, unique constraints per unique base query, "
                       "category mix, share of non-complex prompts.")
    s.set_defaults(handler="tcia_async.flows.taskdb:run_stats")
    s.add_argument("db", help="database directory")
    s.add_argument("--top", type=int, default=20, help="task types listed (default 20)")
    s.add_argument("--json", action="store_true", help="print JSON")


def _engine_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible API base URL (default $OPENAI_BASE_URL)"
                   + ("" if required else "; not needed for a DB built with the simulator"))
    p.add_argument("--embedding-base-url", default=None, help="embeddings API base URL (default: --base-url)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key "
                   "(default OPENAI_API_KEY)")
    p.add_argument("--config", default=None, help="TOML file with an [engine] table")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------


class CorpusItem(msgspec.Struct, kw_only=True, frozen=True):
    line: int  # 1-based line (JSONL) or row (Parquet)
    id: str
    text: str


def instruction_of(value: Any) -> str | None:
    """The instruction in one corpus record: `instruction`, else `prompt`, else the first user turn of
    `messages` (string content, or the text parts of a list content). None when there is none."""
    if not isinstance(value, dict):
        return None
    for key in ("instruction", "prompt"):
        text = value.get(key)
        if isinstance(text, str) and text.strip():
            return text
    messages = value.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict) and msg.get("role") == "user":
                content = msg.get("content")
                if isinstance(content, list):
                    content = "\n".join(p.get("text", "") for p in content
                                        if isinstance(p, dict) and p.get("type") in (None, "text"))
                return content if isinstance(content, str) and content.strip() else None
    return None


def iter_corpus(path: str | os.PathLike[str]) -> Iterator[CorpusItem | BadLine]:
    """Yield the usable records of a corpus file, and a BadLine (file:line: reason) for each unusable one."""
    name = str(path)
    if name.endswith(".parquet"):
        yield from _iter_parquet(name)
        return
    for item in iter_jsonl(path):
        if isinstance(item, BadLine):
            yield item
            continue
        text = instruction_of(item.value)
        if text is None:
            yield BadLine(path=name, line=item.line,
                          reason="no instruction: expected a string `instruction` or `prompt`, or `messages` "
                          "with a user turn")
            continue
        rid = item.value.get("id") if isinstance(item.value, dict) else None
        yield CorpusItem(line=item.line, id=str(rid) if rid is not None else str(item.line), text=text)


def _iter_parquet(name: str) -> Iterator[CorpusItem | BadLine]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{name}: reading Parquet needs pyarrow (pip install 'tcia-async[parquet]'), or "
                         "export the dataset to JSONL") from None
    row = 0
    for batch in pq.ParquetFile(name).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            row += 1
            text = instruction_of(value)
            if text is None:
                yield BadLine(path=name, line=row, reason="row has no instruction, prompt or user message")
            else:
                rid = value.get("id")
                yield CorpusItem(line=row, id=str(rid) if rid is not None else str(row), text=text)


def corpus_hash(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 of the corpus file's bytes, and its line count (read in 1 MB pieces)."""
    h = hashlib.sha256()
    lines = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            lines += chunk.count(b"\n")
    return "sha256:" + h.hexdigest(), lines


class UsageError(Exception):
    """A problem with the command's arguments or inputs (exit 2)."""


# --------------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------------


class Record(msgspec.Struct, kw_only=True):
    """One line of DBDIR/records.jsonl: the decomposition of one corpus line."""

    line: int
    id: str
    decomposition: Decomposition


class BuildSummary(msgspec.Struct, kw_only=True):
    lines: int = 0  # usable corpus records seen
    decomposed: int = 0
    bad_lines: int = 0
    failed: int = 0
    type_texts: int = 0
    constraint_texts: int = 0


async def build_db(
    engine: Any,
    corpus: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str,
    embedding_model: str,
    params: Any = None,
    concurrency: int = 64,
    simulated: bool = False,
    simulator: dict[str, object] | None = None,
    limit: int | None = None,
    progress: Callable[[str], None] | None = _say,
    warn: Callable[[str], None] = _say,
) -> tuple[Any, BuildSummary]:
    """Decompose every usable line of `corpus`, embed, cluster, index; save the TaskDB into `out`; return it.

    Bad corpus lines and failed decompositions are reported (file:line) through `warn`, written to
    `out/failures.jsonl`, counted in the manifest, and skipped. `RunStopped` from the engine propagates (the
    database is then not written; the cache keeps what was answered).
    """
    import anyio

    from tcia_async.engine import RequestFailed
    from tcia_async.retrieval import BuildParams, TaskDB, TaskDBBuilder
    from tcia_async.tcia.decompose import decompose

    say = progress or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest, total_lines = corpus_hash(corpus)
    builder = TaskDBBuilder()
    summary = BuildSummary()
    every = max(1, min(1000, total_lines // 20))

    records = JsonlWriter(out / "records.jsonl")
    failures = JsonlWriter(out / "failures.jsonl")
    try:
        send, recv = anyio.create_memory_object_stream[CorpusItem](max(1, concurrency))

        async def produce() -> None:
            async with send:
                try:
                    await feed()
                except anyio.BrokenResourceError:
                    pass  # every worker is gone: the error that ended them is what the task group reports

        async def feed() -> None:
            for item in iter_corpus(corpus):
                if isinstance(item, BadLine):
                    summary.bad_lines += 1
                    warn(f"skipped {item}")
                    failures.write({"line": item.line, "stage": "read", "error": item.reason})
                    continue
                if limit is not None and summary.lines >= limit:
                    break
                summary.lines += 1
                await send.send(item)

        async def work(items) -> None:
            async with items:
                async for item in items:
                    try:
                        d = await decompose(engine, item.text, model=model)
                    except RequestFailed as exc:
                        summary.failed += 1
                        err = exc.error
                        warn(f"{corpus}:{item.line}: decomposition failed ({err.code}: {err.message})")
                        failures.write({"line": item.line, "id": item.id, "stage": "decompose",
                                        "error": msgspec.to_builtins(err)})
                        continue
                    builder.add(d)
                    records.write(Record(line=item.line, id=item.id, decomposition=d))
                    summary.decomposed += 1
                    if summary.decomposed % every == 0:
                        say(f"decomposed {summary.decomposed} of ~{total_lines} lines")

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                for _ in range(max(1, concurrency)):
                    tg.start_soon(work, recv.clone())
                recv.close()  # the workers hold clones; the stream ends for the producer when they are all done
        except BaseExceptionGroup as group:
            raise _primary(group) from None
    finally:
        records.close()
        failures.close()

    type_texts = builder.type_texts()
    con_texts = builder.constraint_texts()
    summary.type_texts, summary.constraint_texts = len(type_texts), len(con_texts)
    say(f"decomposed {summary.decomposed} lines ({summary.failed} failed, {summary.bad_lines} bad); embedding "
        f"{len(type_texts)} task types and {len(con_texts)} constraints")
    type_vecs = await embed_texts(engine, type_texts, embedding_model, concurrency)
    con_vecs = await embed_texts(engine, con_texts, embedding_model, concurrency)
    if type_vecs is not None and con_vecs is not None and type_vecs.shape[1] != con_vecs.shape[1]:
        raise UsageError(f"{embedding_model} returned vectors of two dimensions: {type_vecs.shape[1]} and "
                         f"{con_vecs.shape[1]}")
    if summary.decomposed == 0:
        # Writing an empty database would look like success: say why nothing could be built instead.
        raise UsageError(f"{corpus}: nothing to build: no instruction was decomposed ({summary.lines} usable "
                         f"lines, {summary.bad_lines} bad lines, {summary.failed} failed decompositions)")
    dim = next((v.shape[1] for v in (type_vecs, con_vecs) if v is not None), 1)
    import numpy as np

    empty = np.empty((0, dim), dtype=np.float32)
    if simulated and simulator is None:
        simulator = {"embedding_dim": dim}
    db = TaskDB.build(
        builder, type_vecs if type_vecs is not None else empty, con_vecs if con_vecs is not None else empty,
        embedding_model=embedding_model, params=params or BuildParams(), decompose_model=model,
        corpus=Path(corpus).name, corpus_hash=digest, simulated=simulated, simulator=simulator,
        skipped={"bad_lines": summary.bad_lines, "failed": summary.failed},
    )
    await anyio.to_thread.run_sync(db.save, out)
    return db, summary


def _primary(group: BaseExceptionGroup) -> BaseException:
    """The exception that ended a task group, for the caller: RunStopped first (the run must stop cleanly),
    then any other, ignoring the cancellations and broken streams it caused in the other tasks."""
    from tcia_async.engine import RunStopped

    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for kinds in ((RunStopped,), (KeyboardInterrupt,), (Exception,)):
        for e in leaves:
            if isinstance(e, kinds):
                return e
    return group


async def embed_texts(engine: Any, texts: list[str], model: str, concurrency: int, chunk: int = 256):
    """Embed `texts` in order, in chunks of `chunk` with a few chunks in flight (the engine packs concurrent
    calls); float32 (len(texts), d), or None for no texts."""
    import anyio
    import numpy as np

    if not texts:
        return None
    starts = iter(range(0, len(texts), chunk))
    parts: dict[int, np.ndarray] = {}

    async def worker() -> None:
        for start in starts:  # a shared iterator: each chunk is taken by exactly one worker
            vecs = np.asarray(await engine.embed(texts[start:start + chunk], model=model), dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(texts[start:start + chunk]):
                raise UsageError(f"{model}: embeddings answer of shape {vecs.shape} for "
                                 f"{len(texts[start:start + chunk])} texts")
            parts[start] = vecs

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(8, concurrency // 8 or 1))):
                tg.start_soon(worker)
    except BaseExceptionGroup as group:
        raise _primary(group) from None
    dims = {v.shape[1] for v in parts.values()}
    if len(dims) != 1:
        raise UsageError(f"{model} returned vectors of several dimensions: {sorted(dims)}")
    return np.vstack([parts[s] for s in sorted(parts)])


async def probe_simulator(base_url: str) -> dict[str, Any] | None:
    """When `base_url` is tcia-async's simulator on loopback, its /sim/stats; otherwise None. Only loopback
    addresses are asked, so a real provider never sees the probe."""
    from urllib.parse import urlsplit

    import aiohttp

    parts = urlsplit(base_url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    url = f"{parts.scheme}://{parts.netloc}/sim/stats"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
                return body if isinstance(body, dict) and "requests" in body else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _engine_config(args: argparse.Namespace, *, cache_path: str | None, concurrency: int | None):
    from tcia_async.config import load_engine_config

    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    return load_engine_config(
        args.config, base_url=base_url, embedding_base_url=args.embedding_base_url,
        api_key_env=args.api_key_env, cache_path=cache_path, concurrency=concurrency,
    )


def run_build(args: argparse.Namespace) -> int:
    from tcia_async.config import ConfigError
    from tcia_async.retrieval import BuildParams, RetrievalError

    if args.mode == "batch":
        _say("db build --mode batch is not available yet (the Batch API transport is a later issue); "
             "use --mode online")
        return EXIT_USAGE
    if not Path(args.corpus).is_file():
        _say(f"{args.corpus}: corpus file not found")
        return EXIT_USAGE
    if not (args.base_url or os.environ.get("OPENAI_BASE_URL")):
        _say("db build needs --base-url (or OPENAI_BASE_URL): the API that decomposes and embeds the corpus")
        return EXIT_USAGE
    defaults = BuildParams()
    params = BuildParams(eps=defaults.eps if args.eps is None else args.eps,
                         min_samples=defaults.min_samples if args.min_samples is None else args.min_samples)
    cache = args.cache or str(Path(args.out) / "cache.db")
    try:
        config = _engine_config(args, cache_path=cache, concurrency=args.concurrency)
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_USAGE
    say = (lambda _m: None) if args.quiet else _say
    try:
        from tcia_async.engine.tuning import tune_gc

        tune_gc()
        db, summary, stats = _run_async(_build_main(config, args, params, say))
    except KeyboardInterrupt:
        _say(f"interrupted; answered calls are cached in {cache}: rerun the same command to continue")
        return EXIT_INTERRUPTED
    except (UsageError, RetrievalError, ConfigError) as exc:
        _say(str(exc))
        return EXIT_USAGE
    except Exception as exc:
        from tcia_async.engine import RunStopped
        from tcia_async.engine.cache import CacheError

        if isinstance(exc, (CacheError, OSError)):
            _say(str(exc))
            return EXIT_USAGE
        if isinstance(exc, RunStopped):
            _say(f"stopped: {exc}; answered calls are cached in {cache}: rerun the same command to continue")
            return EXIT_STOPPED
        raise
    c = db.manifest.counts
    _say(f"task DB written to {args.out}: {c.records} records ({c.non_complex} non-complex), {c.task_types} task "
         f"types in {c.clusters} clusters ({c.singleton_clusters} singletons), {c.constraints} unique constraints; "
         f"{summary.bad_lines} bad lines, {summary.failed} failed decompositions"
         + (" [built with the simulator: not real data]" if db.manifest.simulated else ""))
    if stats is not None:
        _say(f"engine: {stats}")
    return EXIT_OK


async def _build_main(config, args, params, say):
    from tcia_async.engine import Engine

    sim = await probe_simulator(config.base_url)
    if config.embedding_base_url:
        sim = sim if sim is None else await probe_simulator(config.embedding_base_url)
    try:
        async with Engine(config) as engine:
            db, summary = await build_db(
                engine, args.corpus, args.out, model=args.model, embedding_model=args.embedding_model,
                params=params, concurrency=args.concurrency, simulated=sim is not None, limit=args.limit,
                progress=say,
            )
            stats = getattr(engine, "stats", None)
    except BaseExceptionGroup as group:  # the engine's own task group wraps what ended the block
        raise _primary(group) from None
    return db, summary, stats


def _run_async(coro):
    import anyio

    from tcia_async.engine.tuning import event_loop_options

    async def main():
        return await coro

    return anyio.run(main, backend="asyncio", backend_options=event_loop_options())


# --------------------------------------------------------------------------------------------------------------
# Query and stats
# --------------------------------------------------------------------------------------------------------------


def _load(path: str):
    from tcia_async.retrieval import RetrievalError, TaskDB

    try:
        return TaskDB.load(path)
    except RetrievalError as exc:
        _say(str(exc))
        return None


def run_query(args: argparse.Namespace) -> int:
    import contextlib

    from tcia_async.config import ConfigError
    from tcia_async.retrieval import RetrievalError

    text = args.constraint if args.constraint is not None else args.text
    if not text:
        _say('db query needs a text: db query DBDIR "meeting summarization" (or --constraint "Use bullet points")')
        return EXIT_USAGE
    db = _load(args.db)
    if db is None:
        return EXIT_USAGE
    m = db.manifest
    model = args.embedding_model or m.embedding_model
    try:
        db.check_model(model)
    except RetrievalError as exc:
        _say(str(exc))
        return EXIT_USAGE
    url = args.embedding_base_url or args.base_url or os.environ.get("OPENAI_BASE_URL")
    local = contextlib.nullcontext()
    if url is None:
        start = getattr(args, "start_simulator", None)
        if not m.simulated or start is None:
            _say(f"db query needs --base-url (or --embedding-base-url / OPENAI_BASE_URL) to embed the text with "
                 f"{m.embedding_model!r}")
            return EXIT_USAGE
        local = start(**{k: v for k, v in m.simulator.items() if k in ("embedding_dim",)})
    try:
        with local as sim:
            if sim is not None:
                url = sim.base_url
            args.base_url = args.base_url or url
            args.embedding_base_url = args.embedding_base_url or url
            config = _engine_config(args, cache_path=None, concurrency=4)
            vec = _run_async(_embed_one(config, text, model))
        if args.constraint is not None:
            hits = db.nearest_constraints(vec, args.k, embedding_model=model)[0]
            rows = [msgspec.to_builtins(h) for h in hits]
        else:
            rows = []
            for h in db.nearest_task_types(vec, args.k, embedding_model=model)[0]:
                cl = db.cluster(h.cluster)
                pool = sorted(db.constraint_pool(h.cluster), key=lambda c: (-c.count, c.id))[: args.samples]
                rows.append({**msgspec.to_builtins(h), "queries": cl.queries, "member_types": len(cl.types),
                             "pool": len(cl.constraints), "samples": [f"[{c.category}] {c.text}" for c in pool]})
    except (RetrievalError, ConfigError, UsageError) as exc:
        _say(str(exc))
        return EXIT_USAGE
    except Exception as exc:
        from tcia_async.engine import RequestFailed, RunStopped

        if isinstance(exc, (RequestFailed, RunStopped)):
            _say(f"embedding the query failed: {exc}")
            return EXIT_STOPPED if isinstance(exc, RunStopped) else 1
        raise
    if args.json:
        print(msgspec.json.encode(rows).decode())
        return EXIT_OK
    if m.simulated:
        print("(task DB built with the simulator: simulated data)")
    print("cosine distance (0 = same direction), nearest first:")
    if args.constraint is not None:
        for h in rows:
            print(f"{max(h['distance'], 0.0):.3f}  [{h['category']}] {h['text']}")
    else:
        for h in rows:
            print(f"{max(h['distance'], 0.0):.3f}  {h['name']}  (cluster {h['cluster']}: {h['queries']} queries, "
                  f"{h['member_types']} type strings, {h['pool']} constraints; matched {h['matched']!r})")
            for s in h["samples"]:
                print(f"         {s}")
    return EXIT_OK


async def _embed_one(config, text: str, model: str):
    from tcia_async.engine import Engine

    try:
        async with Engine(config) as engine:
            return await engine.embed([text], model=model)
    except BaseExceptionGroup as group:
        raise _primary(group) from None


def run_stats(args: argparse.Namespace) -> int:
    db = _load(args.db)
    if db is None:
        return EXIT_USAGE
    s = db.stats(top=args.top)
    m = db.manifest
    if args.json:
        print(msgspec.json.encode({"manifest": m, "stats": s}).decode())
        return EXIT_OK
    print(f"task DB {args.db}: corpus {m.corpus} ({m.corpus_hash[:19]}...), decomposed by {m.decompose_model}, "
          f"embedded with {m.embedding_model} ({m.embedding_dim}-d)"
          + ("  [simulated]" if m.simulated else ""))
    print(f"records {s['records']}, non-complex {s['non_complex']} ({100 * s['non_complex_share']:.1f} %), "
          f"tasks {s['tasks']}, constraint mentions {s['constraint_mentions']}")
    print(f"task-type strings {s['task_types']} -> {s['clusters']} task types "
          f"({s['singleton_clusters']} singletons; DBSCAN eps={m.parameters.eps}, "
          f"min_samples={m.parameters.min_samples}); unique constraints {s['constraints']}")
    print(f"unique constraints per unique base query, median over task types: "
          f"{s['constraints_per_base_query_median']}")
    print("\ncategory mix (mentions, share, unique):")
    for cat, v in s["category_mix"].items():
        print(f"  {cat:<18} {v['mentions']:>8} {100 * v['share']:6.1f} % {v['unique']:>8}")
    print(f"\ntop {len(s['top_task_types'])} task types by queries:")
    print(f"  {'queries':>8} {'types':>6} {'bases':>6} {'constr':>7} {'c/b':>6}  task type")
    for t in s["top_task_types"]:
        print(f"  {t['queries']:>8} {t['member_types']:>6} {t['unique_base_queries']:>6} "
              f"{t['unique_constraints']:>7} {t['constraints_per_base_query']:>6}  {t['task_type']}")
    return EXIT_OK
