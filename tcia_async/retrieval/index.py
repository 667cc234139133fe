"""A cosine-distance HNSW index (hnswlib) with fixed parameters, so a query gives the same answer every call.

Distances are cosine distances, `1 - cos(a, b)`, in [0, 2]. Vectors are labelled by their row number in the
array they were built from (0..n-1). Queries are batched (one row per query) and never ask hnswlib for more
neighbours than the index holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import hnswlib
import msgspec
import numpy as np


class RetrievalError(Exception):
    """A query or a stored index that cannot be used as asked; the message says why and what was expected."""


class IndexParams(msgspec.Struct, kw_only=True, frozen=True):
    """Build and search parameters. Fixed per index and saved with it, so results do not drift between runs."""

    # Chosen on 100k clustered 384-d vectors (benchmarks/hnsw.py, 2 shared cores): recall@10 ~0.97 at ~5.5k
    # single-thread queries/s and a ~30 s single-thread build; ef_construction 200 bought +0.002 recall for twice
    # the build time.
    M: int = 16
    ef_construction: int = 100
    # Search breadth; a query for k neighbours uses max(ef, k).
    ef: int = 80
    seed: int = 100


class _Meta(msgspec.Struct, kw_only=True):
    dim: int
    count: int
    params: IndexParams
    space: str = "cosine"


def as_matrix(vectors: object, dim: int | None = None, *, what: str = "vectors") -> np.ndarray:
    """`vectors` as a C-contiguous float32 matrix (one row per vector); a single vector becomes one row.

    Raises RetrievalError when the array is not 1-D/2-D, holds NaN or infinity, or its width is not `dim`.
    """
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise RetrievalError(f"{what}: expected a 2-D array (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise RetrievalError(f"{what}: dimension {arr.shape[1]} does not match the index dimension {dim}")
    if arr.size and not np.isfinite(arr).all():
        raise RetrievalError(f"{what}: contains NaN or infinite values")
    return np.ascontiguousarray(arr)


class VectorIndex:
    """HNSW over cosine distance.

    Guarantees: for a given built (or loaded) index, `query(v, k)` returns the same labels and distances on every
    call, whatever the batch it is part of or the number of threads (hnswlib's search has no randomness; ef is
    fixed). A build with `threads=1` is reproducible too (same vectors, same params -> the same graph); with more
    threads insertion order, and so the graph, may vary slightly. Results are approximate: a true neighbour may be
    missed (see benchmarks/hnsw.py for measured recall).
    """

    def __init__(self, index: hnswlib.Index, dim: int, count: int, params: IndexParams) -> None:
        self._index = index
        self.dim = dim
        self.count = count
        self.params = params

    @classmethod
    def build(cls, vectors: object, params: IndexParams | None = None, *, threads: int = 1) -> VectorIndex:
        """Index the rows of `vectors` under labels 0..n-1. An empty matrix gives an empty index."""
        params = params or IndexParams()
        data = as_matrix(vectors)
        n, dim = data.shape
        if dim == 0:
            raise RetrievalError("vectors: dimension 0")
        index = hnswlib.Index(space="cosine", dim=dim)
        index.init_index(max_elements=max(n, 1), M=params.M, ef_construction=params.ef_construction,
                         random_seed=params.seed)
        if n:
            index.add_items(data, np.arange(n, dtype=np.int64), num_threads=threads)
        index.set_ef(params.ef)
        return cls(index, dim, n, params)

    def query(self, vectors: object, k: int, *, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows for each query row: `(labels int64 (q, k'), distances float32 (q, k'))`.

        k' = min(k, count); each row is sorted by increasing distance. Raises RetrievalError on a dimension
        mismatch.
        """
        data = as_matrix(vectors, self.dim, what="query vectors")
        kk = min(int(k), self.count)
        if kk <= 0 or data.shape[0] == 0:
            return (np.empty((data.shape[0], 0), dtype=np.int64), np.empty((data.shape[0], 0), dtype=np.float32))
        ef = max(self.params.ef, kk)
        for attempt in range(3):
            self._index.set_ef(ef)
            try:
                labels, dists = self._index.knn_query(data, k=kk, num_threads=threads)
                break
            except RuntimeError:
                # hnswlib found fewer than k results (possible on tiny or degenerate graphs): search wider, and
                # in the end scan exactly rather than fail.
                ef *= 4
        else:
            labels, dists = self._exact(data, kk)
        self._index.set_ef(self.params.ef)
        return labels.astype(np.int64, copy=False), dists.astype(np.float32, copy=False)

    def vectors(self, labels: object) -> np.ndarray:
        """The stored (unit-normalised) vectors of the given labels, float32 (len(labels), dim)."""
        ids = np.asarray(labels, dtype=np.int64).ravel()
        if ids.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray(self._index.get_items(ids, return_type="numpy"), dtype=np.float32)

    def _exact(self, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        base = self.vectors(np.arange(self.count))
        q = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-30)
        dist = 1.0 - q @ base.T
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(dist, order, axis=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to `path` (hnswlib's binary format) and its parameters to `path` + `.json`."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._index.save_index(str(p))
        meta = _Meta(dim=self.dim, count=self.count, params=self.params)
        Path(str(p) + ".json").write_bytes(msgspec.json.format(msgspec.json.encode(meta)) + b"\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VectorIndex:
        """Read an index written by `save`. Raises RetrievalError naming the file when it is missing or damaged."""
        p = Path(path)
        try:
            meta = msgspec.json.decode(Path(str(p) + ".json").read_bytes(), type=_Meta)
        except FileNotFoundError:
            raise RetrievalError(f"{p}.json: index metadata not found") from None
        except msgspec.DecodeError as exc:
            raise RetrievalError(f"{p}.json: not valid index metadata ({exc})") from None
        if not p.exists():
            raise RetrievalError(f"{p}: index file not found")
        index = hnswlib.Index(space=meta.space, dim=meta.dim)
        try:
            index.load_index(str(p), max_elements=max(meta.count, 1))
        except RuntimeError as exc:
            raise RetrievalError(f"{p}: cannot load the HNSW index ({exc})") from None
        if index.get_current_count() != meta.count:
            raise RetrievalError(f"{p}: holds {index.get_current_count()} vectors, its metadata says {meta.count}")
        index.set_ef(meta.params.ef)
        return cls(index, meta.dim, meta.count, meta.params)
