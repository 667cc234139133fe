"""How well task-type clusters agree with labels given by hand (the corpus's kinds of work).

Both figures are computed over labelled tasks: each task counts once, with its kind and its type's cluster.
- adjusted Rand index: agreement of the two partitions on every pair of tasks, corrected for chance
  (1 = identical partitions, about 0 = no better than chance, negative = worse). It falls both when one kind is
  split over several clusters and when several kinds share one, so it is the figure eps is chosen by.
- purity: the share of tasks whose cluster's most frequent kind is their own. All-singleton clusters score 1,
  so it only means something next to the number of clusters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import msgspec


class Agreement(msgspec.Struct, kw_only=True, frozen=True):
    adjusted_rand: float
    purity: float
    tasks: int  # labelled tasks counted
    kinds: int
    clusters: int  # clusters holding at least one labelled task


def _pairs(n: int) -> float:
    return n * (n - 1) / 2.0


def label_agreement(counts: Iterable[tuple[str, int, int]]) -> Agreement | None:
    """From (kind, cluster, number of tasks) triples (a pair may repeat: counts add up); None without tasks."""
    cells: Counter[tuple[str, int]] = Counter()
    for kind, cluster, n in counts:
        if n > 0:
            cells[(kind, cluster)] += n
    total = sum(cells.values())
    if total == 0:
        return None
    by_kind: Counter[str] = Counter()
    by_cluster: Counter[int] = Counter()
    best: dict[int, int] = {}
    for (kind, cluster), n in cells.items():
        by_kind[kind] += n
        by_cluster[cluster] += n
        best[cluster] = max(best.get(cluster, 0), n)
    index = sum(_pairs(n) for n in cells.values())
    rows = sum(_pairs(n) for n in by_kind.values())
    cols = sum(_pairs(n) for n in by_cluster.values())
    expected = rows * cols / _pairs(total) if total > 1 else 0.0
    top = (rows + cols) / 2.0
    # Both partitions trivial (one group each, or all singletons on both sides): they agree completely.
    ari = 1.0 if top == expected else (index - expected) / (top - expected)
    return Agreement(adjusted_rand=round(ari, 4), purity=round(sum(best.values()) / total, 4), tasks=total,
                     kinds=len(by_kind), clusters=len(by_cluster))
