"""DBSCAN with neighbourhoods answered by an HNSW index, so clustering scales past scikit-learn's O(n^2).

Semantics are scikit-learn's `DBSCAN(eps, min_samples, metric="cosine")`:
- the neighbourhood of a point is every point at cosine distance <= eps, the point itself included;
- a point is *core* when its neighbourhood holds at least `min_samples` points;
- clusters are the connected components of core points (two cores are linked when within eps), numbered in
  the order of their lowest-index member (scikit-learn's discovery order);
- a non-core point within eps of a core point is a *border* point and joins, among the clusters it touches, the
  one with the smallest number — exactly where scikit-learn's scan puts it, but stated as a rule, so it does not
  depend on traversal order;
- every other point is noise (-1).

Why neighbourhoods are never truncated: HNSW answers "the k nearest", DBSCAN needs "all within eps". A point
whose k-th neighbour is still within eps may have more; treating its k as its whole neighbourhood would
under-count (a core point looks like a border point) and drop links between cores (one cluster splits in two).
So such points are asked again with a larger k until the farthest answer lies beyond eps or k covers every
point. Only core points can be truncated (k >= min_samples), so sparse data costs one query per point.

The one approximation left is HNSW's recall: a true neighbour the graph search misses. Links are taken from both
ends (i finds j, or j finds i), which makes a miss on one side harmless.
"""

from __future__ import annotations

import numpy as np

from tcia_async.retrieval.index import IndexParams, RetrievalError, VectorIndex, as_matrix


def dbscan_hnsw(
    vectors: object,
    eps: float,
    min_samples: int = 5,
    *,
    index: VectorIndex | None = None,
    k: int = 32,
    params: IndexParams | None = None,
    threads: int = 1,
    batch: int = 2048,
    return_core: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of `vectors`; return int64 labels (-1 = noise), and with `return_core` also the core mask.

    `index`: an index already built over exactly these rows (labels = row numbers); built here otherwise.
    `k`: the first neighbourhood size asked for (raised to min_samples); dense points are re-asked with 4x k.
    Memory: the sum of neighbourhood sizes, as for scikit-learn.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    data = as_matrix(vectors)
    n = data.shape[0]
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return (empty, np.empty(0, dtype=bool)) if return_core else empty
    if index is None:
        index = VectorIndex.build(data, params, threads=threads)
    elif index.count != n or index.dim != data.shape[1]:
        raise RetrievalError(f"index holds {index.count}x{index.dim} vectors, data is {n}x{data.shape[1]}")

    counts, src, dst = _neighbourhoods(index, data, eps, min_samples, k, threads, batch)
    core = counts >= min_samples
    labels = np.full(n, -1, dtype=np.int64)

    both = core[src] & core[dst]
    roots = _components(n, src[both], dst[both])
    core_ids = np.flatnonzero(core)
    if core_ids.size:
        # Roots are the lowest index of each component, so ranking them gives scikit-learn's numbering.
        _, inverse = np.unique(roots[core_ids], return_inverse=True)
        labels[core_ids] = inverse

    # Border points: the smallest cluster number among the core points they touch (edges from either end).
    one = core[src] ^ core[dst]
    b = np.where(core[src[one]], dst[one], src[one])
    c = np.where(core[src[one]], src[one], dst[one])
    if b.size:
        best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, b, labels[c])
        touched = np.unique(b)
        labels[touched] = best[touched]
    return (labels, core) if return_core else labels


def noise_to_singletons(labels: np.ndarray) -> np.ndarray:
    """Give every noise point (-1) its own cluster, numbered after the existing ones in row order."""
    out = np.array(labels, dtype=np.int64, copy=True)
    noise = np.flatnonzero(out < 0)
    start = int(out.max()) + 1 if out.size and out.max() >= 0 else 0
    out[noise] = np.arange(start, start + noise.size, dtype=np.int64)
    return out


def _neighbourhoods(
    index: VectorIndex, data: np.ndarray, eps: float, min_samples: int, k: int, threads: int, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbourhood sizes (self included) and the within-eps pairs (i, j), i != j, found from i's side."""
    n = data.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    first_k = min(n, max(int(k), int(min_samples), 1))
    for start in range(0, n, batch):
        todo = np.arange(start, min(start + batch, n), dtype=np.int64)
        kk = first_k
        while todo.size:
            labels, dists = index.query(data[todo], kk, threads=threads)
            within = dists <= eps
            # Truncated: every answer within eps and some points never looked at. Ask again with a larger k.
            truncated = within.all(axis=1) & (kk < n)
            done = ~truncated
            rows = np.repeat(todo[done], kk)
            cols = labels[done].ravel()
            keep = within[done].ravel() & (cols != rows)
            srcs.append(rows[keep])
            dsts.append(cols[keep])
            # Count the point itself once, whether or not the search returned it.
            counts[todo[done]] = within[done].sum(axis=1) + (1 - (within[done] & (labels[done] == todo[done, None])).any(axis=1))
            todo = todo[truncated]
            kk = min(n, kk * 4)
    src = np.concatenate(srcs) if srcs else np.empty(0, dtype=np.int64)
    dst = np.concatenate(dsts) if dsts else np.empty(0, dtype=np.int64)
    return counts, src, dst


def _components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of the graph (n nodes, undirected edges src-dst): each node's component root, which
    is the lowest node index in its component.

    Vectorised union-find: hook every root onto the smallest root it is linked to, then jump pointers to the
    roots; repeat until no edge joins two roots. parent[x] <= x always holds, so no cycle can form.
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ru = parent[src]
        rv = parent[dst]
        diff = ru != rv
        if not diff.any():
            return parent
        ru = ru[diff]
        rv = rv[diff]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def dbscan_exact(vectors: object, eps: float, min_samples: int = 5, *, block: int = 1024) -> np.ndarray:
    """Exact DBSCAN (scikit-learn's scan, metric="cosine"): brute-force neighbourhoods, O(n^2) time.

    The reference `dbscan_hnsw` is checked against (tests, benchmarks/hnsw.py), and a fine choice below a few
    thousand points. Points are visited in index order, each unlabelled core point grows its cluster depth-first.
    """
    x = as_matrix(vectors).astype(np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    neigh: list[np.ndarray] = []
    for start in range(0, len(u), block):  # row blocks: memory O(n * block), not O(n^2)
        dist = 1.0 - u[start:start + block] @ u.T
        neigh.extend(np.flatnonzero(row <= eps) for row in dist)
    core = np.array([len(nb) >= min_samples for nb in neigh], dtype=bool)
    labels = np.full(len(x), -1, dtype=np.int64)
    label = 0
    for i in range(len(x)):
        if labels[i] != -1 or not core[i]:
            continue
        stack = [i]
        while stack:
            p = stack.pop()
            if labels[p] != -1:
                continue
            labels[p] = label
            if core[p]:
                stack.extend(int(q) for q in neigh[p] if labels[q] == -1)
        label += 1
    return labels
