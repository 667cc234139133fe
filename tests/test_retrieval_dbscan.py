"""DBSCAN on HNSW neighbourhoods against an exact, literal DBSCAN (scikit-learn's algorithm, written out here)."""

from __future__ import annotations

import numpy as np
import pytest

from tcia_async.retrieval import IndexParams, VectorIndex, dbscan_hnsw, noise_to_singletons
from tcia_async.retrieval.dbscan import dbscan_exact as exact_dbscan


def blobs(rng: np.random.Generator, n_centers: int, per: int, dim: int, spread: float) -> np.ndarray:
    centers = rng.normal(size=(n_centers, dim))
    pts = np.repeat(centers, per, axis=0) + rng.normal(scale=spread, size=(n_centers * per, dim))
    noise = rng.normal(size=(per, dim))
    x = np.vstack([pts, noise]).astype(np.float32)
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("eps", "min_samples"), [(0.05, 3), (0.1, 5), (0.2, 10)])
def test_same_clusters_as_exact_dbscan(seed: int, eps: float, min_samples: int) -> None:
    rng = np.random.default_rng(seed)
    x = blobs(rng, n_centers=12, per=40, dim=24, spread=0.12)
    want = exact_dbscan(x, eps, min_samples)
    # A small first k forces the grow-k path for dense points; identical labels, numbering included.
    got = dbscan_hnsw(x, eps, min_samples, k=4)
    assert (want >= 0).sum() > len(x) // 2, "the data should form real clusters"
    assert (want == -1).sum() > 0, "and have some noise"
    np.testing.assert_array_equal(got, want)


def test_truncated_neighbourhood_would_split_a_cluster() -> None:
    """Two tight groups of 30 points whose nearest cross-pair is within eps: with k=8 and no regrowth every
    point's 8 nearest lie in its own group, so the link would be lost. The result must be one cluster."""
    rng = np.random.default_rng(5)
    dim = 16
    a = np.zeros(dim); a[0] = 1.0
    b = np.zeros(dim); b[0] = np.cos(0.3); b[1] = np.sin(0.3)  # cosine distance ~0.045 between centres
    ga = a + rng.normal(scale=0.01, size=(30, dim))
    gb = b + rng.normal(scale=0.01, size=(30, dim))
    x = np.vstack([ga, gb]).astype(np.float32)
    eps = 0.06
    want = exact_dbscan(x, eps, 3)
    assert len(set(want)) == 1
    np.testing.assert_array_equal(dbscan_hnsw(x, eps, 3, k=8), want)


def test_border_point_between_two_clusters_joins_the_first() -> None:
    """A non-core point within eps of cores of two clusters goes to the cluster numbered first, wherever it sits
    in the input; the same rule as scikit-learn's scan, stated independently of traversal order."""
    dim = 8
    def at(angle: float) -> np.ndarray:
        v = np.zeros(dim); v[0] = np.cos(angle); v[1] = np.sin(angle)
        return v
    # Cluster A: 0.22, 0.25, 0.30 rad; cluster B: 0.50, 0.55, 0.58; the point in the gap sits at 0.40.
    # eps admits pairs up to 0.105 rad apart, min_samples=4: 0.30 and 0.50 are core (self, two of their own, and
    # the gap point); the gap point sees itself, 0.30 and 0.50 only: 3 < 4, a border point of both clusters.
    left = [at(0.22), at(0.25), at(0.30)]
    right = [at(0.50), at(0.55), at(0.58)]
    mid = at(0.40)
    eps = 1 - np.cos(0.105)
    for order in ([*left, mid, *right], [mid, *right, *left], [*right, mid, *left], [mid, *left, *right]):
        x = np.array(order, dtype=np.float32)
        want = exact_dbscan(x, eps, 4)
        labels, core = dbscan_hnsw(x, eps, 4, k=2, return_core=True)
        np.testing.assert_array_equal(labels, want)
        mid_row = next(i for i, v in enumerate(order) if v is mid)
        assert not core[mid_row]
        assert core.sum() == 2
        # Whichever cluster is numbered first (its lowest row comes first) takes the gap point.
        assert labels[mid_row] == 0
        assert set(labels) == {0, 1}


def test_deterministic_and_index_reuse() -> None:
    rng = np.random.default_rng(3)
    x = blobs(rng, 8, 30, 16, 0.15)
    first = dbscan_hnsw(x, 0.1, 4)
    for _ in range(3):
        np.testing.assert_array_equal(dbscan_hnsw(x, 0.1, 4), first)
    index = VectorIndex.build(x, IndexParams(seed=7))
    np.testing.assert_array_equal(dbscan_hnsw(x, 0.1, 4, index=index), first)


def test_noise_becomes_singletons() -> None:
    labels = np.array([0, -1, 1, -1, 0])
    np.testing.assert_array_equal(noise_to_singletons(labels), [0, 2, 1, 3, 0])
    np.testing.assert_array_equal(noise_to_singletons(np.array([-1, -1])), [0, 1])


def test_edge_cases() -> None:
    assert dbscan_hnsw(np.empty((0, 4), dtype=np.float32), 0.1, 2).shape == (0,)
    np.testing.assert_array_equal(dbscan_hnsw(np.eye(3, dtype=np.float32), 0.1, 1), [0, 1, 2])
    np.testing.assert_array_equal(dbscan_hnsw(np.eye(3, dtype=np.float32), 0.1, 2), [-1, -1, -1])
    # Exact duplicates, more of them than the first k: all one cluster.
    dup = np.tile(np.array([[1.0, 2.0, 3.0]], dtype=np.float32), (50, 1))
    np.testing.assert_array_equal(dbscan_hnsw(dup, 1e-3, 40, k=4), np.zeros(50))
    with pytest.raises(ValueError):
        dbscan_hnsw(np.eye(3), -1.0, 2)
