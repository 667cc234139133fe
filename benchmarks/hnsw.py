"""HNSW retrieval and DBSCAN-on-HNSW, measured on synthetic clustered vectors.

1. Index n random-but-clustered 384-d vectors with the task DB's index parameters (tcia_async.retrieval
   IndexParams defaults), then: recall@10 of held-out queries against exact numpy search, queries per second on
   one thread (best of three passes of one batched call, and one call per query as the TCIA search makes them), build time on one thread
   (the task DB's setting: reproducible graphs) and on all cores. Targets (issue 4): recall@10 >= 0.97,
   >= 5,000 q/s, build <= 60 s.
2. DBSCAN-on-HNSW vs an exact brute-force DBSCAN (scikit-learn's algorithm on a full distance matrix) on
   `dbscan_n` points: agreement (adjusted Rand index, and exact equality of the partitions up to renaming) and
   the speed-up.

    python benchmarks/hnsw.py [--n 100000] [--quick] [--out benchmarks/results/hnsw.json]

`run(n, ...)` returns the figures as a dict (the bench harness calls it); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tcia_async.retrieval import IndexParams, VectorIndex, dbscan_hnsw  # noqa: E402
from tcia_async.retrieval.dbscan import dbscan_exact as exact_dbscan  # noqa: E402

DIM = 384
TARGETS = {"recall_at_10": 0.97, "qps": 5000.0, "build_s": 60.0}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clustered(n: int, dim: int, *, clusters: int, spread: float, noise_share: float, seed: int) -> np.ndarray:
    """n vectors: Gaussian blobs around `clusters` random centres (per-coordinate std `spread` against the centres'
    1, so two members of one blob have cosine ~ 1 / (1 + spread^2)), plus a share of unclustered points."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    n_noise = int(n * noise_share)
    which = rng.integers(0, clusters, size=n - n_noise)
    x = np.empty((n, dim), dtype=np.float32)
    x[: n - n_noise] = centres[which] + spread * rng.standard_normal((n - n_noise, dim), dtype=np.float32)
    x[n - n_noise:] = rng.standard_normal((n_noise, dim), dtype=np.float32)
    return x[rng.permutation(n)]


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        sim = q[s:s + chunk] @ b.T
        part = np.argpartition(-sim, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1)
        out[s:s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (noise points count as one label each, as singletons)."""
    def relabel(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        noise = x < 0
        x[noise] = x.max() + 1 + np.arange(noise.sum())
        return np.unique(x, return_inverse=True)[1]
    a, b = relabel(a), relabel(b)
    n = len(a)
    pairs = np.unique(a * (b.max() + 1) + b, return_counts=True)[1]
    comb = lambda v: (v * (v - 1) / 2.0).sum()  # noqa: E731
    sum_ij = comb(pairs.astype(np.float64))
    sum_a = comb(np.bincount(a).astype(np.float64))
    sum_b = comb(np.bincount(b).astype(np.float64))
    expected = sum_a * sum_b / (n * (n - 1) / 2.0)
    maximum = (sum_a + sum_b) / 2.0
    return 1.0 if maximum == expected else float((sum_ij - expected) / (maximum - expected))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming the clusters (noise must be noise in both)."""
    if not np.array_equal(a < 0, b < 0):
        return False
    m = a >= 0
    pairs = set(zip(a[m].tolist(), b[m].tolist()))
    return len(pairs) == len(set(a[m].tolist())) == len(set(b[m].tolist()))


def run(n: int = 100_000, *, queries: int = 2000, dbscan_n: int = 5000, seed: int = 0,
        build_threads_all: bool = False) -> dict:
    params = IndexParams()
    say(f"hnsw: {n} x {DIM} clustered vectors, params {params}")
    x = clustered(n + queries, DIM, clusters=max(n // 100, 10), spread=0.6, noise_share=0.05, seed=seed)
    base, q = x[:n], x[n:]

    t0 = time.perf_counter()
    index = VectorIndex.build(base, params, threads=1)
    build_s = time.perf_counter() - t0
    say(f"hnsw: built on 1 thread in {build_s:.1f} s")
    build_all_s = None
    if build_threads_all and (os.cpu_count() or 1) > 1:
        t0 = time.perf_counter()
        VectorIndex.build(base, params, threads=os.cpu_count() or 1)
        build_all_s = time.perf_counter() - t0
        say(f"hnsw: built on {os.cpu_count()} threads in {build_all_s:.1f} s")

    t0 = time.perf_counter()
    truth = exact_knn(base, q, 10)
    exact_s = time.perf_counter() - t0

    index.query(q[:50], 10)  # warm caches
    # Best of three timed passes: on a shared machine the fastest pass is the one least disturbed by others.
    passes = []
    for _ in range(3):
        t0 = time.perf_counter()
        got, _ = index.query(q, 10, threads=1)
        passes.append(time.perf_counter() - t0)
    batch_s = min(passes)
    recall = float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got.tolist(), truth.tolist())]))
    m = min(len(q), 1000)
    t0 = time.perf_counter()
    for i in range(m):
        index.query(q[i], 10)
    single_s = time.perf_counter() - t0
    qps = len(q) / batch_s
    say(f"hnsw: recall@10 {recall:.4f}, {qps:,.0f} q/s batched, {m / single_s:,.0f} q/s one call each; "
        f"exact numpy {len(q) / exact_s:,.0f} q/s")

    # DBSCAN: 50 blobs of ~100 points, eps between the within-blob and between-blob distances.
    xd = clustered(dbscan_n, DIM, clusters=max(dbscan_n // 100, 2), spread=0.6, noise_share=0.05, seed=seed + 1)
    eps, min_samples = 0.45, 5
    t0 = time.perf_counter()
    want = exact_dbscan(xd, eps, min_samples)
    exact_db_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got_db = dbscan_hnsw(xd, eps, min_samples, threads=1)
    hnsw_db_s = time.perf_counter() - t0
    ari = adjusted_rand(want, got_db)
    same = same_partition(want, got_db)
    say(f"dbscan: {dbscan_n} points, exact {exact_db_s:.2f} s, on HNSW {hnsw_db_s:.2f} s (index build included), "
        f"ARI {ari:.4f}, identical partition: {same}")

    import hnswlib  # noqa: F401  (version below)

    res = {
        "n": n, "dim": DIM, "queries": len(q),
        "params": {"M": params.M, "ef_construction": params.ef_construction, "ef": params.ef, "seed": params.seed},
        "recall_at_10": round(recall, 4),
        "qps": round(qps, 1),
        "qps_median_of_3": round(len(q) / sorted(passes)[1], 1),
        "qps_one_call_each": round(m / single_s, 1),
        "exact_numpy_qps": round(len(q) / exact_s, 1),
        "build_s": round(build_s, 2),
        "build_s_all_threads": round(build_all_s, 2) if build_all_s is not None else None,
        "targets": TARGETS,
        "pass": {"recall_at_10": recall >= TARGETS["recall_at_10"], "qps": qps >= TARGETS["qps"],
                 "build_s": build_s <= TARGETS["build_s"]},
        "dbscan": {
            "n": dbscan_n, "eps": eps, "min_samples": min_samples,
            "clusters_exact": int(want.max() + 1), "noise_exact": int((want < 0).sum()),
            "clusters_hnsw": int(got_db.max() + 1), "noise_hnsw": int((got_db < 0).sum()),
            "adjusted_rand": round(ari, 4), "identical_partition": same,
            "exact_s": round(exact_db_s, 3), "hnsw_s": round(hnsw_db_s, 3),
            "speedup": round(exact_db_s / hnsw_db_s, 2),
        },
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "hnswlib": _version("hnswlib")},
    }
    return res


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="vectors in the index (default 100000; --quick 20000)")
    p.add_argument("--quick", action="store_true", help="20k vectors, 1,000 queries, DBSCAN on 2k points")
    p.add_argument("--dbscan-n", type=int, default=None)
    p.add_argument("--all-threads", action="store_true", help="also time a build on every core")
    p.add_argument("--out", default=str(HERE / "results" / "hnsw.json"))
    a = p.parse_args(argv)
    n = a.n or (20_000 if a.quick else 100_000)
    res = run(n, queries=1000 if a.quick else 2000, dbscan_n=a.dbscan_n or (2000 if a.quick else 5000),
              build_threads_all=a.all_threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
