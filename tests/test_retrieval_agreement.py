"""Label agreement of clusters with hand-given kinds: adjusted Rand index and purity."""

from __future__ import annotations

import pytest

from tcia_async.retrieval import label_agreement


def triples(kinds: list[str], clusters: list[int]) -> list[tuple[str, int, int]]:
    return [(k, c, 1) for k, c in zip(kinds, clusters)]


def test_adjusted_rand_matches_known_values() -> None:
    # Values as scikit-learn's adjusted_rand_score gives them for the same labelings.
    a = label_agreement(triples(list("aabb"), [0, 0, 1, 2]))
    assert a.adjusted_rand == pytest.approx(0.5714, abs=1e-4)
    assert label_agreement(triples(list("aabb"), [5, 5, 9, 9])).adjusted_rand == 1.0  # names do not matter
    assert label_agreement(triples(list("aaaa"), [0, 1, 2, 3])).adjusted_rand == 0.0
    assert label_agreement(triples(list("aabb"), [0, 1, 0, 1])).adjusted_rand == pytest.approx(-0.5)


def test_purity_counts_and_repeated_cells() -> None:
    # Counts add up: (kind, cluster, n) rows for the same cell are one cell.
    a = label_agreement([("a", 0, 2), ("a", 0, 1), ("b", 0, 1), ("b", 1, 4)])
    assert (a.tasks, a.kinds, a.clusters) == (8, 2, 2)
    assert a.purity == pytest.approx((3 + 4) / 8)
    # Singletons everywhere: pure, but no agreement on pairs.
    single = label_agreement(triples(list("aabb"), [0, 1, 2, 3]))
    assert single.purity == 1.0 and single.adjusted_rand == 0.0
    assert label_agreement([]) is None and label_agreement([("a", 0, 0)]) is None
