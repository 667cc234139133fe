"""The TCIA retrieve step's similarity search: Replace gets `depth` choices from the pool whatever the cluster
holds besides (placeholder constraints, the seed's own)."""

from __future__ import annotations

import anyio
import numpy as np

from tcia_async.records import Constraint, Decomposition, SeedTask, SetConstraint, Task
from tcia_async.retrieval import BuildParams, TaskDB, TaskDBBuilder
from tcia_async.tcia.explore import PLACEHOLDER
from tcia_async.tcia.retrieve import retrieve

DIM = 32
PLACEHOLDERS = [f"Use the document provided as source {i}." for i in range(12)]
OTHERS = [f"Mention point {j}." for j in range(10)]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


# Placeholders sit close to axis 0, the other constraints farther from it and from each other: any constraint
# near axis 0 has the 12 placeholders as its nearest neighbours in the cluster.
VECTORS = {"Report Writing": axis(31), "Write the report.": axis(31), "Brand new constraint.": axis(0),
           **{t: unit(axis(0) + 0.2 * axis(1 + i)) for i, t in enumerate(PLACEHOLDERS)},
           **{t: unit(axis(0) + axis(13 + j)) for j, t in enumerate(OTHERS)}}


def database() -> TaskDB:
    b = TaskDBBuilder()
    b.add(Decomposition(complex=True, language=["en"], tasks=[Task(
        task_type="Report Writing", base_query="Write the report.",
        constraints=[Constraint(category=PLACEHOLDER, constraint=t) for t in PLACEHOLDERS]
        + [Constraint(category="Content", constraint=t) for t in OTHERS])]))

    def rows(texts: list[str]) -> np.ndarray:
        return np.stack([VECTORS[t] for t in texts])

    return TaskDB.build(b, rows(b.type_texts()), rows(b.constraint_texts()), example_vectors=rows(b.example_texts()),
                        embedding_model="toy", params=BuildParams(eps=0.01))


class Engine:
    async def embed(self, texts, model, stage, priority):
        return np.stack([VECTORS[t] for t in texts])


def test_replace_gets_depth_choices_when_many_cluster_constraints_are_not_in_the_pool() -> None:
    db = database()
    own = SetConstraint(text=OTHERS[0], category="Content")
    new = SetConstraint(text="Brand new constraint.", category="Content")
    task = SeedTask(seed_id="s", instruction="Write the report.", task_type="Report Writing",
                    base_query="Write the report.", constraints=[own, new])
    got = anyio.run(lambda: retrieve(Engine(), db, task, embedding_model="toy", depth=8))
    assert [c.text for c in got.pool] == sorted(OTHERS[1:], key=lambda t: db.constraint_id(t))
    # From a seed constraint (vector from the engine) and from a pool constraint (vector from the database): 8
    # choices each, none a placeholder, none the seed's own constraint, none the constraint itself.
    for c in (new, got.pool[0]):
        similar = got.similar(c)
        assert len(similar) == 8
        assert {s.text for s in similar} <= set(OTHERS[1:]) - {c.text}
    # Fewer only when the pool has fewer.
    small = anyio.run(lambda: retrieve(Engine(), db, task, embedding_model="toy", depth=20))
    assert len(small.similar(got.pool[0])) == len(OTHERS) - 2
