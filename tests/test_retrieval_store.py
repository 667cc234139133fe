"""The HNSW index wrapper and the task DB store: determinism, round trips, clear errors on mismatched vectors."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import msgspec
import numpy as np
import pytest

from tcia_async.records import Constraint, Decomposition, Task
from tcia_async.retrieval import (
    BuildParams,
    RetrievalError,
    TaskDB,
    TaskDBBuilder,
    VectorIndex,
)

DIM = 64


def embed(texts: list[str], dim: int = DIM) -> np.ndarray:
    """A toy embedding: hashed words, so texts sharing words are near in cosine."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().replace(".", "").split():
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 20) & 1 else -1.0
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
    return out


def decomp(task_type: str, base: str, *cons: tuple[str, str]) -> Decomposition:
    return Decomposition(complex=bool(cons), language=["en"], tasks=[Task(
        task_type=task_type, base_query=base,
        constraints=[Constraint(category=cat, constraint=text) for cat, text in cons])] if cons else [])


CORPUS = [
    decomp("Meeting Summarization", "Summarize the meeting transcript.", ("Numerical", "Use at most 120 words."),
           ("Style/Tone", "Use a neutral tone.")),
    decomp("Meeting Summarization", "Summarize the meeting notes.", ("Format", "Use bullet points."),
           ("Style/Tone", "use a neutral tone")),
    decomp("meeting summarization", "Summarize the call.", ("Content", "List every action item with an owner.")),
    decomp("Code Generation", "Write a Python function that reverses a list.", ("Content", "Include a docstring."),
           ("Format", "Return only the code block.")),
    decomp("Python Code Generation", "Write a function that sorts numbers.", ("Content", "Add type hints.")),
    decomp("Translation", "Translate the paragraph.", ("Language", "Translate into French."),
           ("Style/Tone", "Keep the formal register.")),
    decomp("Email Writing", "Write an email to a client.", ("Numerical", "Keep it under 150 words.")),
    decomp("Summarize", "Summarize it."),  # non-complex: no tasks
]


KINDS = ["meeting", "meeting", "meeting", "code", "code", "translation", "email", None]


def build(corpus=CORPUS, dim: int = DIM, kinds=None, examples: bool = True, **kw) -> TaskDB:
    b = TaskDBBuilder()
    for d, kind in zip(corpus, kinds or [None] * len(corpus)):
        b.add(d, kind)
    return TaskDB.build(b, embed(b.type_texts(), dim), embed(b.constraint_texts(), dim),
                        example_vectors=embed(b.example_texts(), dim) if examples else None,
                        embedding_model="toy-embed", params=BuildParams(eps=0.35, min_samples=2), **kw)


def test_index_is_deterministic_batched_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32)).astype(np.float32)
    index = VectorIndex.build(x)
    labels, dists = index.query(x[:50], 10)
    for _ in range(3):
        l2, d2 = index.query(x[:50], 10)
        np.testing.assert_array_equal(l2, labels)
        np.testing.assert_array_equal(d2, dists)
    # One query at a time gives what the batch gave.
    for i in range(0, 50, 7):
        li, di = index.query(x[i], 10)
        np.testing.assert_array_equal(li[0], labels[i])
    assert (labels[:, 0] == np.arange(50)).all() and np.allclose(dists[:, 0], 0, atol=1e-5)
    assert (np.diff(dists, axis=1) >= 0).all()
    # A rebuild with the same params gives the same graph, and so the same answers.
    np.testing.assert_array_equal(VectorIndex.build(x).query(x[:50], 10)[0], labels)
    index.save(tmp_path / "x.hnsw")
    loaded = VectorIndex.load(tmp_path / "x.hnsw")
    assert (loaded.dim, loaded.count, loaded.params) == (32, 500, index.params)
    np.testing.assert_array_equal(loaded.query(x[:50], 10)[0], labels)
    # k beyond the size: every vector, no error.
    small = VectorIndex.build(x[:3])
    assert small.query(x[0], 10)[0].shape == (1, 3)
    with pytest.raises(RetrievalError, match="dimension 16"):
        index.query(np.zeros((1, 16), np.float32), 3)
    with pytest.raises(RetrievalError, match="not found"):
        VectorIndex.load(tmp_path / "missing.hnsw")


def test_build_groups_types_and_pools_constraints() -> None:
    db = build()
    c = db.manifest.counts
    assert (c.records, c.non_complex, c.tasks) == (8, 1, 7)
    # "Meeting Summarization" spelled two ways is one type; "use a neutral tone" and "Use a neutral tone." one
    # constraint counted twice.
    texts = [t.text for t in db.types]
    assert texts.count("Meeting Summarization") == 1 and "meeting summarization" not in texts
    neutral = db.constraint_id("USE A NEUTRAL TONE")
    assert neutral is not None and db.constraints[neutral].count == 2
    # Every constraint lands in the pool of its task type's cluster.
    meeting = db.nearest_task_types(embed(["Meeting Summarization"]), 1)[0][0]
    assert meeting.name == "Meeting Summarization" and meeting.matched == "Meeting Summarization"
    # Ranked by the blend of nearest member and centroid: exact on the member, not on the whole cluster.
    assert meeting.matched_distance < 1e-5 < meeting.distance
    pool = {p.text for p in db.constraint_pool(meeting.cluster)}
    assert {"Use at most 120 words.", "Use bullet points.", "List every action item with an owner."} <= pool
    assert "Translate into French." not in pool
    # The two code-generation strings share a word: DBSCAN puts them in one cluster whose pool holds both.
    code = db.nearest_task_types(embed(["Code Generation"]), 1)[0][0]
    cl = db.cluster(code.cluster)
    assert {db.types[i].text for i in cl.types} == {"Code Generation", "Python Code Generation"}
    assert {"Include a docstring.", "Add type hints."} <= {p.text for p in db.constraint_pool(code.cluster)}
    # Every type is in exactly one cluster; noise types are singletons.
    assert sorted(i for cl in db.clusters for i in cl.types) == list(range(len(db.types)))
    assert c.clusters == len(db.clusters) and c.singleton_clusters >= 1


def test_queries_exclude_and_k() -> None:
    db = build()
    hits = db.nearest_task_types(embed(["Meeting Summarization", "Email Writing"]), k=3)
    assert [len(h) for h in hits] == [3, 3]
    assert len({h.cluster for h in hits[0]}) == 3
    assert [h.distance for h in hits[0]] == sorted(h.distance for h in hits[0])
    q = embed(["Use bullet points."])
    top = db.nearest_constraints(q, k=3)[0]
    assert top[0].text == "Use bullet points." and len(top) == 3
    skipped = db.nearest_constraints(q, k=3, exclude=["use bullet points"])[0]
    assert "Use bullet points." not in [h.text for h in skipped] and len(skipped) == 3
    assert db.nearest_constraints(q, k=3, exclude=[top[0].id])[0] == skipped
    # In-pool search is limited to the cluster's constraints.
    meeting = db.nearest_task_types(embed(["Meeting Summarization"]), 1)[0][0].cluster
    pool_ids = set(db.cluster(meeting).constraints)
    in_pool = db.nearest_in_pool(meeting, embed(["Use a friendly tone."]), k=10)[0]
    assert {h.id for h in in_pool} == pool_ids
    assert in_pool[0].text == "Use a neutral tone."
    # Same answers every call.
    assert db.nearest_constraints(q, k=5) == db.nearest_constraints(q, k=5)


def test_save_load_round_trip(tmp_path: Path) -> None:
    db = build(corpus_hash="abc", simulated=True, decompose_model="m")
    db.save(tmp_path / "db")
    back = TaskDB.load(tmp_path / "db")
    assert back.manifest == db.manifest
    assert back.types == db.types and back.clusters == db.clusters and back.constraints == db.constraints
    q = embed(["Summarize the transcript in bullet points", "Translate into German"])
    assert back.nearest_task_types(q, 2) == db.nearest_task_types(q, 2)
    assert back.nearest_constraints(q, 4) == db.nearest_constraints(q, 4)
    assert back.stats() == db.stats()


def test_order_of_arrival_does_not_change_the_db(tmp_path: Path) -> None:
    pairs = list(zip(CORPUS, KINDS))
    random.Random(4).shuffle(pairs)
    a, b = build(kinds=KINDS), build([d for d, _ in pairs], kinds=[k for _, k in pairs])
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    for name in ("manifest.json", "types.jsonl", "clusters.jsonl", "constraints.jsonl", "examples.jsonl",
                 "types.hnsw", "constraints.hnsw", "examples.hnsw", "centroids.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_wrong_dimension_or_model_is_a_clear_error(tmp_path: Path) -> None:
    db = build()
    db.save(tmp_path / "db")
    db = TaskDB.load(tmp_path / "db")
    with pytest.raises(RetrievalError, match=r"dimension 32.*64-d vectors of 'toy-embed'"):
        db.nearest_task_types(embed(["Translation"], 32), 1)
    with pytest.raises(RetrievalError, match=r"dimension 32"):
        db.nearest_constraints(embed(["Translation"], 32), 1)
    with pytest.raises(RetrievalError, match=r"embedded with 'toy-embed'.*'text-embedding-3-large'"):
        db.nearest_constraints(embed(["x"]), 1, embedding_model="text-embedding-3-large")
    db.nearest_constraints(embed(["x"]), 1, embedding_model="toy-embed")  # the right model is fine
    with pytest.raises(RetrievalError, match="not a task database"):
        TaskDB.load(tmp_path)
    (tmp_path / "db" / "clusters.jsonl").write_text('{"id": 0}\n')
    with pytest.raises(RetrievalError, match=r"clusters.jsonl:1"):
        TaskDB.load(tmp_path / "db")


def test_stats() -> None:
    s = build().stats()
    assert s["non_complex_share"] == pytest.approx(1 / 8, abs=1e-4)
    assert s["top_task_types"][0]["task_type"] == "Meeting Summarization"
    top = s["top_task_types"][0]
    assert (top["queries"], top["unique_base_queries"]) == (3, 3)
    assert top["unique_constraints"] == 4 and top["constraints_per_base_query"] == pytest.approx(4 / 3, abs=1e-3)
    mix = s["category_mix"]
    assert sum(v["mentions"] for v in mix.values()) == s["constraint_mentions"] == 11
    assert mix["Style/Tone"]["mentions"] == 3 and mix["Style/Tone"]["unique"] == 2


def test_empty_builder() -> None:
    db = TaskDB.build(TaskDBBuilder(), np.empty((0, 8)), np.empty((0, 8)), embedding_model="e")
    assert db.nearest_task_types(np.ones(8), 3) == [[]]
    assert db.nearest_constraints(np.ones(8), 3) == [[]]


def test_examples_find_a_cluster_from_a_task_description() -> None:
    db = build()
    assert db.manifest.counts.examples == len(db.examples) == 7
    meeting = next(t for t in db.types if t.text == "Meeting Summarization")
    assert {e.text for e in db.examples if e.type == meeting.id} == {
        "Summarize the meeting transcript.", "Summarize the meeting notes.", "Summarize the call."}
    # A description shares no word with the type name, but does with an example of its work.
    hit = db.nearest_task_types(embed(["summarize the call"]), 2)[0][0]
    assert hit.cluster == meeting.cluster and hit.matched == "Summarize the call."
    assert hit.matched_distance < 1e-5 and hit.matched_distance <= hit.distance
    # Without examples the same description finds nothing of the kind first.
    names_only = build(examples=False)
    assert names_only.nearest_task_types(embed(["summarize the call"]), 1)[0][0].matched != "Summarize the call."


def test_examples_are_a_bounded_sample_that_ignores_arrival_order() -> None:
    corpus = [decomp("Code Generation", f"Write function number {i}.", ("Content", "Add tests.")) for i in range(40)]
    a, b = TaskDBBuilder(examples_per_type=5), TaskDBBuilder(examples_per_type=5)
    for d in corpus:
        a.add(d)
    for d in reversed(corpus):
        b.add(d)
    assert len(a.example_texts()) == 5 and a.example_texts() == b.example_texts()
    assert a.counts.tasks == 40


def test_kinds_give_the_label_agreement_and_each_cluster_its_kind(tmp_path: Path) -> None:
    db = build(kinds=KINDS)
    meeting = next(t for t in db.types if t.text == "Meeting Summarization")
    assert meeting.kinds == {"meeting": 3} and db.cluster_kind(meeting.cluster) == "meeting"
    a = db.manifest.agreement
    assert a is not None and a.tasks == 7 and a.kinds == 4 and a.purity == 1.0
    assert db.stats()["label_agreement"]["adjusted_rand"] == a.adjusted_rand
    # The manifest is the one source: stats do not compute the agreement again.
    other = msgspec.structs.replace(a, adjusted_rand=0.123)
    db.manifest = msgspec.structs.replace(db.manifest, agreement=other)
    assert db.stats()["label_agreement"] == msgspec.to_builtins(other)
    db.manifest = msgspec.structs.replace(db.manifest, agreement=a)
    db.save(tmp_path / "db")
    assert TaskDB.load(tmp_path / "db").manifest.agreement == a
    # No kinds, no agreement; the types files stay free of empty fields.
    plain = build()
    assert plain.manifest.agreement is None and plain.stats()["label_agreement"] is None
    plain.save(tmp_path / "plain")
    assert b'"kinds"' not in (tmp_path / "plain" / "types.jsonl").read_bytes()


def test_reembedded_keeps_clusters_and_pools_with_new_vectors() -> None:
    db = build(kinds=KINDS)
    types, examples, constraints = db.texts()
    assert len(types) == len(db.types) and len(examples) == len(db.examples)
    new = db.reembedded(embed(types, 32), embed(examples, 32), embed(constraints, 32),
                        embedding_model="toy-32", embedding_identity="toy/32")
    m = new.manifest
    assert (m.embedding_model, m.embedding_dim, m.embedding_identity, m.clustered_with) == (
        "toy-32", 32, "toy/32", "toy-embed")
    assert new.clusters == db.clusters and new.types == db.types and m.agreement == db.manifest.agreement
    hit = new.nearest_task_types(embed(["Translation"], 32), 1, embedding_model="toy-32")[0][0]
    assert hit.name == "Translation"
    with pytest.raises(RetrievalError, match="vectors for"):
        db.reembedded(embed(types[:1], 32), embed(examples, 32), embed(constraints, 32), embedding_model="x")


def test_a_format_1_database_still_loads(tmp_path: Path) -> None:
    import json

    db = build(examples=False)
    db.save(tmp_path / "db")
    for name in ("examples.jsonl", "examples.hnsw", "examples.hnsw.json", "centroids.npy"):
        (tmp_path / "db" / name).unlink()
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    manifest["format"] = 1
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    old = TaskDB.load(tmp_path / "db")
    q = embed(["Meeting Summarization", "Translate into German"])
    assert old.nearest_task_types(q, 2) == db.nearest_task_types(q, 2)


def test_damaged_files_are_named_in_the_error(tmp_path: Path) -> None:
    import shutil

    build().save(tmp_path / "db")

    def damaged(name: str, change) -> Path:
        d = tmp_path / name
        shutil.copytree(tmp_path / "db", d)
        change(d)
        return d

    cut = damaged("cut", lambda d: (d / "clusters.jsonl").write_bytes(
        b"\n".join((d / "clusters.jsonl").read_bytes().splitlines()[:2]) + b"\n"))
    with pytest.raises(RetrievalError, match=r"types.jsonl:\d+: cluster \d+, but .*clusters.jsonl holds 2"):
        TaskDB.load(cut)
    half = damaged("half", lambda d: (d / "clusters.jsonl").write_bytes((d / "clusters.jsonl").read_bytes()[:-9]))
    with pytest.raises(RetrievalError, match=r"clusters.jsonl:\d+: .*truncated or damaged"):
        TaskDB.load(half)

    def manifest_dir(d: Path) -> None:
        (d / "manifest.json").unlink()
        (d / "manifest.json").mkdir()

    with pytest.raises(RetrievalError, match=r"manifest.json: cannot be read"):
        TaskDB.load(damaged("mdir", manifest_dir))
    with pytest.raises(RetrievalError, match=r"centroids.npy: .*shape"):
        TaskDB.load(damaged("cent", lambda d: np.save(d / "centroids.npy", np.zeros((1, 3), np.float32))))
    with pytest.raises(RetrievalError, match=r"examples.jsonl: missing"):
        TaskDB.load(damaged("noex", lambda d: (d / "examples.jsonl").unlink()))


def _two_clusters(member_weight: float) -> TaskDB:
    """Alpha: its name and one example along x, one example along y; Beta: name and example at 53 degrees from x.
    A query along y is nearest to an Alpha member (cos 1) but to Beta's centroid (cos 0.8 against Alpha's 0.447)."""
    vec = {"Alpha": (1, 0, 0, 0), "Do alpha work.": (1, 0, 0, 0), "Do alpha, the other way.": (0, 1, 0, 0),
           "Beta": (0.6, 0.8, 0, 0), "Do beta work.": (0.6, 0.8, 0, 0), "Be brief.": (0, 0, 1, 0),
           "Be kind.": (0, 0, 0, 1)}
    b = TaskDBBuilder()
    b.add(decomp("Alpha", "Do alpha work.", ("Content", "Be brief.")))
    b.add(decomp("Alpha", "Do alpha, the other way.", ("Content", "Be brief.")))
    b.add(decomp("Beta", "Do beta work.", ("Content", "Be kind.")))

    def rows(texts: list[str]) -> np.ndarray:
        return np.array([vec[t] for t in texts], dtype=np.float32)

    return TaskDB.build(b, rows(b.type_texts()), rows(b.constraint_texts()), example_vectors=rows(b.example_texts()),
                        embedding_model="toy", params=BuildParams(eps=0.01, member_weight=member_weight))


def test_member_weight_sets_how_clusters_are_ranked(tmp_path: Path) -> None:
    q = np.array([[0, 1, 0, 0]], dtype=np.float32)
    by_member = _two_clusters(1.0).nearest_task_types(q, 2)[0]
    assert [h.name for h in by_member] == ["Alpha", "Beta"]
    assert by_member[0].matched == "Do alpha, the other way." and by_member[0].distance == pytest.approx(0.0, abs=1e-6)
    by_centroid = _two_clusters(0.0).nearest_task_types(q, 2)[0]
    assert [h.name for h in by_centroid] == ["Beta", "Alpha"]
    assert [h.distance for h in by_centroid] == pytest.approx([0.2, 1 - 1 / 5 ** 0.5], abs=1e-5)
    # The weighted sum: Alpha 0.3 * 1 + 0.7 * 0.447 = 0.613, Beta 0.8.
    mixed = _two_clusters(0.3)
    assert [h.distance for h in mixed.nearest_task_types(q, 2)[0]] == pytest.approx([0.2, 1 - 0.3 - 0.7 / 5 ** 0.5],
                                                                                    abs=1e-5)
    # Kept by save and load; re-embedding keeps it unless the new model's is given.
    mixed.save(tmp_path / "db")
    assert TaskDB.load(tmp_path / "db").manifest.parameters.member_weight == 0.3
    texts = mixed.texts()
    vectors = [np.array(mixed.members(0)[1][:1].tolist() * len(t), dtype=np.float32) for t in texts]
    assert mixed.reembedded(*vectors, embedding_model="x").manifest.parameters.member_weight == 0.3
    assert mixed.reembedded(*vectors, embedding_model="x", member_weight=0.5).manifest.parameters.member_weight == 0.5


def test_a_manifest_without_member_weight_ranks_as_before(tmp_path: Path) -> None:
    import json

    build().save(tmp_path / "db")
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    del manifest["parameters"]["member_weight"]
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    assert TaskDB.load(tmp_path / "db").manifest.parameters.member_weight == 0.5
