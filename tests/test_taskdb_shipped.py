"""The prebuilt task DB shipped in the package: complete, built from the shipped corpus, queryable."""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np

from tcia_async.records import CATEGORIES
from tcia_async.retrieval import TaskDB

DATA = resources.files("tcia_async") / "data"


def test_shipped_db_matches_the_shipped_corpus() -> None:
    db = TaskDB.load(DATA / "taskdb")
    m = db.manifest
    digest = "sha256:" + hashlib.sha256((DATA / "corpus.jsonl").read_bytes()).hexdigest()
    assert m.corpus_hash == digest, "corpus.jsonl changed: rebuild with `python scripts/build_shipped_db.py`"
    assert m.simulated and m.embedding_model == "tcia-sim-ngram" and m.embedding_dim == 384
    assert m.counts.records >= 300 and m.skipped == {"bad_lines": 0, "failed": 0}
    assert len(db.clusters) >= 20
    assert set(CATEGORIES) <= {c.category for c in db.constraints}
    # Every cluster of a real (non-singleton) task type owns a non-empty pool, and pools hold valid ids.
    big = [cl for cl in db.clusters if cl.queries >= 5]
    assert len(big) >= 8 and all(db.constraint_pool(cl.id) for cl in big)
    # Stored vectors are unit length: the index matches what was embedded.
    v = db.constraint_vectors(np.arange(10))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    # A type's own vector finds its own cluster.
    t = next(t for t in db.types if t.text == "Summarization")
    hit = db.nearest_task_types(db._type_index.vectors([t.id]), 1)[0][0]
    assert hit.cluster == t.cluster and hit.distance < 1e-4
