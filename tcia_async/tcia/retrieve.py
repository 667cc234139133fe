"""Stage 2, retrieve: the task-type cluster nearest to the seed's task type, and its constraint pool.

The seed's task type is embedded with the task database's embedding model and matched to the nearest cluster;
the cluster's constraints are the pool that Add and Replace draw from (explore.py: the paper's Algorithm 1). The
pool leaves out constraints that only point at input material (Input Placeholder): the context slot stays the
seed's. Replace needs the pool constraints nearest to a constraint: for the seed's own constraints their
vectors come from the engine (cached), for pool constraints from the database; `Retrieval.similar` answers both,
exactly and deterministically (pools are small enough for exact search).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tcia_async.records import RETRIEVED, SeedTask, SetConstraint
from tcia_async.tcia.explore import PLACEHOLDER, _key


class Retrieval:
    """What explore needs from the task database for one seed: the pool, and similarity within it."""

    def __init__(self, db: Any, cluster: int, name: str, distance: float, matched: str,
                 pool: list[SetConstraint], pool_ids: list[int], seed_vectors: dict[str, np.ndarray],
                 embedding_model: str, depth: int) -> None:
        self.db = db
        self.cluster = cluster
        self.name = name
        self.distance = distance
        self.matched = matched
        self.pool = pool
        self._ids = {_key(c.text): i for c, i in zip(pool, pool_ids)}
        self._by_id = {i: c for c, i in zip(pool, pool_ids)}
        # The cluster's constraints that are not in our pool (placeholders, the seed's own): skipped by the search.
        self._outside = [i for i in db.cluster(cluster).constraints if i not in self._by_id]
        self._seed_vectors = seed_vectors
        self._model = embedding_model
        self._depth = depth
        self._memo: dict[str, list[SetConstraint]] = {}

    def similar(self, constraint: SetConstraint) -> Sequence[SetConstraint]:
        """Pool constraints by decreasing similarity to `constraint` (itself excluded), at most `depth`."""
        key = _key(constraint.text)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        cid = self._ids.get(key)
        if cid is not None:
            vec = self.db.constraint_vectors([cid])
        elif key in self._seed_vectors:
            vec = self._seed_vectors[key][None, :]
        else:
            return []
        skip = self._outside + ([cid] if cid is not None else [])
        hits = self.db.nearest_in_pool(self.cluster, vec, self._depth, exclude=skip, embedding_model=self._model)[0]
        out = [self._by_id[h.id] for h in hits]
        self._memo[key] = out
        return out


async def retrieve(engine: Any, db: Any, task: SeedTask, *, embedding_model: str, depth: int = 8,
                   priority: int = 0) -> Retrieval:
    """The nearest task-type cluster to `task.task_type` and its pool (see the module docstring)."""
    texts = [task.task_type] + [c.text for c in task.constraints]
    vectors = await engine.embed(texts, model=embedding_model, stage="retrieve", priority=priority)
    hit = db.nearest_task_types(vectors[:1], 1, embedding_model=embedding_model)[0][0]
    pool: list[SetConstraint] = []
    ids: list[int] = []
    seed_keys = {_key(c.text) for c in task.constraints}
    for entry in db.constraint_pool(hit.cluster):
        if entry.category == PLACEHOLDER or _key(entry.text) in seed_keys:
            continue
        pool.append(SetConstraint(text=entry.text, category=entry.category, origin=RETRIEVED))
        ids.append(entry.id)
    seed_vectors = {_key(c.text): vectors[i + 1] for i, c in enumerate(task.constraints)}
    return Retrieval(db, hit.cluster, hit.name, float(hit.distance), hit.matched, pool, ids, seed_vectors,
                     embedding_model, depth)
