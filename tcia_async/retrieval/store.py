"""The task database: decomposed instructions grouped into task-type clusters, each owning a pool of constraints.

Built in two steps so that this module stays pure (vectors in, neighbours out):
1. `TaskDBBuilder.add(decomposition, kind=None)` for every decomposed instruction (any order);
2. the caller embeds `builder.type_texts()`, `builder.example_texts()` and `builder.constraint_texts()` with one
   embedding model and calls `TaskDB.build(builder, type_vectors, constraint_vectors, example_vectors=...)`,
   which clusters the task types (DBSCAN on HNSW, noise -> singleton types), builds the indexes, the cluster
   centroids and the manifest.

A cluster is found from a text by its members: its task-type names and examples of its work (base queries, up to
`examples_per_type` per type string). Names alone are short labels ("Meeting Summarization") that a task
description ("summarise a meeting transcript") matches poorly; base queries are written like descriptions.
A cluster's score blends its nearest member (a specific match) and its centroid (the whole body of its work):
`distance = 1 - (w cos(query, nearest member) + (1 - w) cos(query, centroid))`, w = `BuildParams.member_weight`
(per embedding model, like eps). The centroid pools the evidence of every member; the member's share keeps a text
the database holds in its own cluster first. For `local`, w = 0.3 was chosen by leave-one-out on the corpus
(benchmarks/retrieval_validation.py: its base queries and type names as queries, their own entries removed):
top-3 of the right kind 0.78 and 0.88 (equal weights 0.74 and 0.86, nearest member alone 0.61 and 0.85,
centroid alone 0.82 and 0.84 but 9% of stored type names then miss their own cluster). On the retrieval
benchmark's descriptions (benchmarks/retrieval.py --ablation): type names alone 0.74, nearest member 0.86,
centroid 0.87, the blend 0.89 (the same with equal weights).

On disk (`save(dir)` / `load(dir)`): `manifest.json`, `types.jsonl`, `clusters.jsonl`, `constraints.jsonl`,
`examples.jsonl`, `types.hnsw`, `constraints.hnsw`, `examples.hnsw` (each with a `.json` of index parameters)
and `centroids.npy`. Ids are assigned in sorted order of the normalised texts, so the same decompositions give
the same database whatever order they arrived in.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from tcia_async.records import CATEGORIES, Decomposition
from tcia_async.retrieval.agreement import Agreement, label_agreement
from tcia_async.retrieval.dbscan import dbscan_hnsw, noise_to_singletons
from tcia_async.retrieval.index import IndexParams, RetrievalError, VectorIndex, as_matrix

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 has no examples and no centroids file (computed from the types on load)


def normalise(text: str) -> str:
    """The identity of a task type or constraint: case-folded, whitespace collapsed, trailing period dropped."""
    return " ".join(text.split()).casefold().rstrip(".").rstrip()


# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


class Counts(msgspec.Struct, kw_only=True):
    records: int = 0  # decomposed instructions
    non_complex: int = 0  # of which `complex: false`
    tasks: int = 0
    constraint_mentions: int = 0
    task_types: int = 0  # unique task-type strings
    clusters: int = 0
    singleton_clusters: int = 0  # DBSCAN noise, each its own type
    constraints: int = 0  # unique constraints
    examples: int = 0  # base queries indexed as examples of their task type


class BuildParams(msgspec.Struct, kw_only=True):
    eps: float = 0.15
    min_samples: int = 2
    index: IndexParams = IndexParams()
    # Base queries kept per task-type string as retrieval examples: a uniform sample (smallest hashes), so a type
    # with 100k queries costs no more than one with 50.
    examples_per_type: int = 50
    # A cluster's score is this share of the query's cosine to its nearest member plus the rest of its cosine to
    # the centroid (module docstring). Depends on the embedding model, like eps; 0.5 is the untuned default.
    member_weight: float = 0.5


class Manifest(msgspec.Struct, kw_only=True):
    """What a task DB was built from and how. Vectors of another model or dimension must not be queried."""

    format: int = FORMAT_VERSION
    embedding_model: str
    embedding_dim: int
    # The exact model behind `embedding_model` when it runs in-process (package, model, variant, prefix).
    embedding_identity: str = ""
    # The model whose vectors the task types were clustered with, when the DB was re-embedded since.
    clustered_with: str = ""
    decompose_model: str = ""
    # Where the decompositions came from: "" = decomposed by `decompose_model` during the build; "file" = read
    # from a file of decomposed records; "curated" = the project's hand-written reference decompositions.
    decompositions: str = ""
    decompositions_hash: str = ""  # sha256 of the decompositions file, when there was one
    # True when decompositions and embeddings came from tcia-async's simulator, not a real model.
    simulated: bool = False
    # Simulator settings needed to embed queries the same way (dimension, seed); empty otherwise.
    simulator: dict[str, object] = {}
    corpus: str = ""
    corpus_hash: str = ""
    counts: Counts = msgspec.field(default_factory=Counts)
    parameters: BuildParams = msgspec.field(default_factory=BuildParams)
    # Agreement of the clusters with the corpus's kinds of work, when the corpus labels them.
    agreement: Agreement | None = None
    # Lines of the corpus that could not be used (bad JSON, no instruction, failed decomposition).
    skipped: dict[str, int] = {}


class TaskType(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    id: int
    text: str
    cluster: int
    queries: int  # tasks of this type in the corpus
    # Labelled corpus lines whose main (first) task has this type, by kind of work.
    kinds: dict[str, int] = {}


class Cluster(msgspec.Struct, kw_only=True, frozen=True):
    id: int
    name: str  # the member type with the most queries
    types: list[int]
    queries: int
    base_queries: int  # unique base queries among its tasks
    constraints: list[int]  # the pool: unique constraint ids, ascending


class ConstraintEntry(msgspec.Struct, kw_only=True, frozen=True):
    id: int
    text: str
    category: str
    count: int  # mentions in the corpus


class Example(msgspec.Struct, kw_only=True, frozen=True):
    """A base query of the corpus, indexed as an example of its task type's work."""

    id: int
    text: str
    type: int


class TypeHit(msgspec.Struct, kw_only=True, frozen=True):
    cluster: int
    name: str
    distance: float  # 1 - (w cos to the nearest member + (1 - w) cos to the centroid): what hits are ranked by
    matched: str  # the member (type name or example) nearest to the query
    matched_distance: float  # its cosine distance


class ConstraintHit(msgspec.Struct, kw_only=True, frozen=True):
    id: int
    text: str
    category: str
    distance: float


# --------------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------------


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class _TypeAcc:
    __slots__ = ("text", "queries", "bases", "constraints", "examples", "kinds")

    def __init__(self, text: str) -> None:
        self.text = text
        self.queries = 0
        self.bases: set[int] = set()
        self.constraints: set[str] = set()
        self.examples: dict[int, str] = {}  # hash of the normalised base query -> its text
        self.kinds: Counter[str] = Counter()

    def keep_example(self, h: int, text: str, limit: int) -> None:
        """Keep the `limit` base queries with the smallest hashes: the same sample whatever the arrival order."""
        old = self.examples.get(h)
        if old is not None:
            if text < old:
                self.examples[h] = text
            return
        if len(self.examples) < limit:
            self.examples[h] = text
            return
        worst = max(self.examples)
        if h < worst:
            del self.examples[worst]
            self.examples[h] = text


class _ConstraintAcc:
    __slots__ = ("text", "count", "categories")

    def __init__(self, text: str) -> None:
        self.text = text
        self.count = 0
        self.categories: Counter[str] = Counter()


class TaskDBBuilder:
    """Accumulates decompositions. Memory: the unique task types and constraints (texts and counts), one 64-bit
    hash per unique base query and at most `examples_per_type` base-query texts per type; not the records."""

    def __init__(self, examples_per_type: int = BuildParams().examples_per_type) -> None:
        self._types: dict[str, _TypeAcc] = {}
        self._constraints: dict[str, _ConstraintAcc] = {}
        self.counts = Counts()
        self.examples_per_type = examples_per_type
        self._frozen: tuple[list[str], list[str]] | None = None

    def add(self, decomposition: Decomposition, kind: str | None = None) -> None:
        """Add one decomposed instruction; `kind` (its hand-given kind of work) labels its main, first task."""
        self._frozen = None
        c = self.counts
        c.records += 1
        if not decomposition.complex or not decomposition.tasks:
            c.non_complex += 1
        for i, task in enumerate(decomposition.tasks):
            type_text = " ".join(task.task_type.split()) or "Unknown"
            key = normalise(type_text)
            acc = self._types.get(key)
            if acc is None:
                acc = self._types[key] = _TypeAcc(type_text)
            elif type_text < acc.text:  # the spelling kept does not depend on arrival order
                acc.text = type_text
            acc.queries += 1
            if kind and i == 0:
                acc.kinds[kind] += 1
            base = " ".join(task.base_query.split())
            if base:
                h = _h64(normalise(base))
                acc.bases.add(h)
                if self.examples_per_type > 0:
                    acc.keep_example(h, base, self.examples_per_type)
            c.tasks += 1
            for con in task.constraints:
                text = " ".join(con.constraint.split())
                ckey = normalise(text)
                if not ckey:
                    continue
                cacc = self._constraints.get(ckey)
                if cacc is None:
                    cacc = self._constraints[ckey] = _ConstraintAcc(text)
                elif text < cacc.text:
                    cacc.text = text
                cacc.count += 1
                cacc.categories[con.category] += 1
                acc.constraints.add(ckey)
                c.constraint_mentions += 1

    def _keys(self) -> tuple[list[str], list[str]]:
        if self._frozen is None:
            self._frozen = (sorted(self._types), sorted(self._constraints))
        return self._frozen

    def type_texts(self) -> list[str]:
        """The unique task-type strings, in id order (the order their vectors must come in)."""
        return [self._types[k].text for k in self._keys()[0]]

    def constraint_texts(self) -> list[str]:
        """The unique constraint strings, in id order."""
        return [self._constraints[k].text for k in self._keys()[1]]

    def _examples(self) -> list[Example]:
        out: list[Example] = []
        for tid, key in enumerate(self._keys()[0]):
            texts = sorted(self._types[key].examples.values(), key=lambda t: (normalise(t), t))
            start = len(out)
            out.extend([Example(id=start + j, text=t, type=tid) for j, t in enumerate(texts)])
        return out

    def example_texts(self) -> list[str]:
        """The base queries kept as examples, in id order: by task type, then by normalised text. A base query
        shared by two types is an example of each, so a text may appear twice."""
        return [e.text for e in self._examples()]


def _category(votes: Counter[str]) -> str:
    # Most frequent; ties go to the first in CATEGORIES order, then alphabetical, so the choice is stable.
    rank = {name: i for i, name in enumerate(CATEGORIES)}
    return min(votes.items(), key=lambda kv: (-kv[1], rank.get(kv[0], len(rank)), kv[0]))[0]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-30)


def _centroids(types: list[TaskType], examples: list[Example], n_clusters: int, type_vectors: np.ndarray,
               example_vectors: np.ndarray, dim: int) -> np.ndarray:
    """Unit mean of each cluster's member vectors (its types' names and examples), float32 (n_clusters, dim)."""
    sums = np.zeros((n_clusters, dim), dtype=np.float64)
    if types:
        np.add.at(sums, np.array([t.cluster for t in types], dtype=np.int64), _unit(type_vectors))
    if examples:
        np.add.at(sums, np.array([types[e.type].cluster for e in examples], dtype=np.int64), _unit(example_vectors))
    return _unit(sums).astype(np.float32)


def _agreement(types: list[TaskType]) -> Agreement | None:
    return label_agreement((kind, t.cluster, n) for t in types for kind, n in t.kinds.items())


# --------------------------------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------------------------------


class TaskDB:
    """A built task database, queried by vectors.

    Guarantees: every query method returns the same answer on every call (fixed ef, deterministic search, ties
    broken by id). Query vectors must have the manifest's dimension; when the caller names the embedding model
    (`embedding_model=`), it must be the manifest's. Either mismatch raises RetrievalError.
    """

    def __init__(
        self,
        manifest: Manifest,
        types: list[TaskType],
        clusters: list[Cluster],
        constraints: list[ConstraintEntry],
        type_index: VectorIndex,
        constraint_index: VectorIndex,
        path: Path | None = None,
        *,
        examples: list[Example] | None = None,
        example_index: VectorIndex | None = None,
        centroids: np.ndarray | None = None,
    ) -> None:
        self.manifest = manifest
        self.types = types
        self.clusters = clusters
        self.constraints = constraints
        self.examples = examples or []
        self._type_index = type_index
        self._constraint_index = constraint_index
        dim = type_index.dim
        self._example_index = example_index or VectorIndex.build(np.empty((0, dim), np.float32))
        if centroids is None:
            centroids = _centroids(types, self.examples, len(clusters), type_index.vectors(np.arange(len(types))),
                                   self._example_index.vectors(np.arange(len(self.examples))), dim)
        self._centroids = centroids
        self.path = path
        self._constraint_ids = {normalise(c.text): c.id for c in constraints}
        self._pool_vectors: dict[int, np.ndarray] = {}
        self._members: dict[int, tuple[list[str], np.ndarray]] = {}
        self._cluster_examples: dict[int, list[int]] | None = None

    # ---- build / save / load ---------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        builder: TaskDBBuilder,
        type_vectors: object,
        constraint_vectors: object,
        *,
        example_vectors: object | None = None,
        embedding_model: str,
        embedding_identity: str = "",
        params: BuildParams | None = None,
        decompose_model: str = "",
        decompositions: str = "",
        decompositions_hash: str = "",
        corpus: str = "",
        corpus_hash: str = "",
        simulated: bool = False,
        simulator: dict[str, object] | None = None,
        skipped: dict[str, int] | None = None,
        threads: int = 1,
    ) -> TaskDB:
        """Cluster the task types and index types, examples and constraints. Vector rows follow
        `builder.type_texts()`, `builder.example_texts()` and `builder.constraint_texts()`; without
        `example_vectors` no examples are indexed (clusters are then found by their type names only). With
        `threads=1` the result is reproducible bit for bit."""
        params = params or BuildParams()
        type_keys, con_keys = builder._keys()
        examples = builder._examples() if example_vectors is not None else []
        tv = as_matrix(type_vectors, what="task-type vectors")
        cv = as_matrix(constraint_vectors, what="constraint vectors")
        ev = as_matrix(example_vectors if example_vectors is not None else np.empty((0, tv.shape[1])),
                       what="example vectors")
        for got, want, what in ((tv, len(type_keys), "task types"), (cv, len(con_keys), "constraints"),
                                (ev, len(examples), "examples")):
            if got.shape[0] != want:
                raise RetrievalError(f"{got.shape[0]} vectors for {want} {what}")
        dims = {m.shape[1] for m in (tv, cv, ev) if m.shape[0]}
        if len(dims) > 1:
            raise RetrievalError(f"task-type, example and constraint vectors differ in dimension: {sorted(dims)}")
        dim = dims.pop() if dims else max(tv.shape[1], cv.shape[1], 1)

        def index(m: np.ndarray) -> VectorIndex:
            return VectorIndex.build(m if m.shape[0] else np.empty((0, dim), np.float32), params.index,
                                     threads=threads)

        type_index, constraint_index, example_index = index(tv), index(cv), index(ev)
        raw = dbscan_hnsw(tv, params.eps, params.min_samples, index=type_index, threads=threads) if len(type_keys) \
            else np.empty(0, np.int64)
        n_noise = int((raw < 0).sum())
        labels = noise_to_singletons(raw)

        con_id = {k: i for i, k in enumerate(con_keys)}
        accs = [builder._types[k] for k in type_keys]
        types = [TaskType(id=i, text=a.text, cluster=int(labels[i]), queries=a.queries,
                          kinds=dict(sorted(a.kinds.items())))
                 for i, a in enumerate(accs)]
        members: dict[int, list[int]] = {}
        for t in types:
            members.setdefault(t.cluster, []).append(t.id)
        clusters: list[Cluster] = []
        for cid in range(len(members)):
            ids = members[cid]
            name_id = min(ids, key=lambda i: (-types[i].queries, i))
            bases: set[int] = set()
            pool: set[int] = set()
            for i in ids:
                bases |= accs[i].bases
                pool.update(con_id[k] for k in accs[i].constraints)
            clusters.append(Cluster(id=cid, name=types[name_id].text, types=ids,
                                    queries=sum(types[i].queries for i in ids), base_queries=len(bases),
                                    constraints=sorted(pool)))
        constraints = [
            ConstraintEntry(id=i, text=builder._constraints[k].text, category=_category(builder._constraints[k].categories),
                            count=builder._constraints[k].count)
            for i, k in enumerate(con_keys)
        ]
        counts = msgspec.structs.replace(builder.counts, task_types=len(types), clusters=len(clusters),
                                         singleton_clusters=n_noise, constraints=len(constraints),
                                         examples=len(examples))
        manifest = Manifest(embedding_model=embedding_model, embedding_dim=dim,
                            embedding_identity=embedding_identity, decompose_model=decompose_model,
                            decompositions=decompositions, decompositions_hash=decompositions_hash,
                            simulated=simulated, simulator=dict(simulator or {}),
                            corpus=corpus, corpus_hash=corpus_hash, counts=counts, parameters=params,
                            agreement=_agreement(types), skipped=dict(skipped or {}))
        centroids = _centroids(types, examples, len(clusters), tv, ev, dim)
        return cls(manifest, types, clusters, constraints, type_index, constraint_index, examples=examples,
                   example_index=example_index, centroids=centroids)

    def texts(self) -> tuple[list[str], list[str], list[str]]:
        """The texts behind the vectors, in id order: task types, examples, constraints (for `reembedded`)."""
        return ([t.text for t in self.types], [e.text for e in self.examples], [c.text for c in self.constraints])

    def reembedded(self, type_vectors: object, example_vectors: object, constraint_vectors: object, *,
                   embedding_model: str, embedding_identity: str = "", simulator: dict[str, object] | None = None,
                   member_weight: float | None = None, threads: int = 1) -> TaskDB:
        """The same database with vectors of another model (rows follow `texts()`): new indexes and centroids,
        the clusters and pools unchanged (they stay those found with the vectors of `clustered_with`).
        `simulator`: the settings of the simulator that made the new vectors, when it did one. `member_weight`:
        the new model's (BuildParams), else the one the database has."""
        tv = as_matrix(type_vectors, what="task-type vectors")
        ev = as_matrix(example_vectors, what="example vectors")
        cv = as_matrix(constraint_vectors, what="constraint vectors")
        for got, want, what in ((tv, len(self.types), "task types"), (ev, len(self.examples), "examples"),
                                (cv, len(self.constraints), "constraints")):
            if got.shape[0] != want:
                raise RetrievalError(f"{got.shape[0]} vectors for {want} {what}")
        dims = {m.shape[1] for m in (tv, ev, cv) if m.shape[0]}
        if len(dims) != 1:
            raise RetrievalError(f"re-embedding needs vectors of one dimension, got {sorted(dims)}")
        dim = dims.pop()
        p = self.manifest.parameters.index

        def index(m: np.ndarray) -> VectorIndex:
            return VectorIndex.build(m if m.shape[0] else np.empty((0, dim), np.float32), p, threads=threads)

        m = self.manifest
        # Anything simulated before (decompositions, clusters) stays so: the flag is never cleared.
        params = m.parameters if member_weight is None else msgspec.structs.replace(m.parameters,
                                                                                     member_weight=member_weight)
        manifest = msgspec.structs.replace(m, embedding_model=embedding_model, embedding_dim=dim,
                                           embedding_identity=embedding_identity, parameters=params,
                                           clustered_with=m.clustered_with or m.embedding_model,
                                           simulated=m.simulated or bool(simulator), simulator=dict(simulator or {}))
        if manifest.clustered_with == embedding_model:
            manifest = msgspec.structs.replace(manifest, clustered_with="")
        return TaskDB(manifest, self.types, self.clusters, self.constraints, index(tv), index(cv),
                      examples=self.examples, example_index=index(ev),
                      centroids=_centroids(self.types, self.examples, len(self.clusters), tv, ev, dim))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the database into `directory` (created if needed). The manifest is written last, so a directory
        with a manifest holds a complete database."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)
        enc = msgspec.json.Encoder()
        for name, rows in (("types.jsonl", self.types), ("clusters.jsonl", self.clusters),
                           ("constraints.jsonl", self.constraints), ("examples.jsonl", self.examples)):
            with open(d / name, "wb") as fh:
                for row in rows:
                    fh.write(enc.encode(row) + b"\n")
        self._type_index.save(d / "types.hnsw")
        self._constraint_index.save(d / "constraints.hnsw")
        self._example_index.save(d / "examples.hnsw")
        with open(d / "centroids.npy", "wb") as fh:
            np.save(fh, self._centroids, allow_pickle=False)
        manifest = msgspec.structs.replace(self.manifest, format=FORMAT_VERSION)
        (d / "manifest.json").write_bytes(msgspec.json.format(enc.encode(manifest)) + b"\n")
        self.manifest = manifest
        self.path = d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TaskDB:
        """Read a database written by `save`. Raises RetrievalError naming the file when one is missing, damaged
        (truncated, not what it should be) or inconsistent with the others."""
        d = Path(directory)
        if not d.is_dir():
            raise RetrievalError(f"{d}: no such database directory")
        mpath = d / "manifest.json"
        if not mpath.exists():
            raise RetrievalError(f"{d}: not a task database (no manifest.json; was `db build` interrupted?)")
        try:
            manifest = msgspec.json.decode(mpath.read_bytes(), type=Manifest)
        except msgspec.DecodeError as exc:
            raise RetrievalError(f"{mpath}: not a task DB manifest ({exc})") from None
        except OSError as exc:
            raise RetrievalError(f"{mpath}: cannot be read ({exc.strerror or exc})") from None
        if manifest.format not in READABLE_FORMATS:
            raise RetrievalError(f"{d}: task DB format {manifest.format}, this version reads "
                                 f"{', '.join(map(str, READABLE_FORMATS))}")
        types = _read_rows(d / "types.jsonl", TaskType)
        clusters = _read_rows(d / "clusters.jsonl", Cluster)
        constraints = _read_rows(d / "constraints.jsonl", ConstraintEntry)
        examples: list[Example] = _read_rows(d / "examples.jsonl", Example) if manifest.format >= 2 else []
        _check_references(d, types, clusters, constraints, examples)
        type_index = VectorIndex.load(d / "types.hnsw")
        constraint_index = VectorIndex.load(d / "constraints.hnsw")
        example_index = centroids = None
        if manifest.format >= 2:
            example_index = VectorIndex.load(d / "examples.hnsw")
            centroids = _read_matrix(d / "centroids.npy", (len(clusters), manifest.embedding_dim))
        if type_index.count != len(types) or constraint_index.count != len(constraints) or (
                example_index is not None and example_index.count != len(examples)):
            raise RetrievalError(f"{d}: indexes and records disagree in size; rebuild the database")
        if type_index.dim != manifest.embedding_dim:
            raise RetrievalError(f"{d / 'types.hnsw'}: {type_index.dim}-d vectors, the manifest says "
                                 f"{manifest.embedding_dim}; rebuild the database")
        return cls(manifest, types, clusters, constraints, type_index, constraint_index, path=d,
                   examples=examples, example_index=example_index, centroids=centroids)

    # ---- queries ---------------------------------------------------------------------------------------------

    def check_model(self, embedding_model: str | None) -> None:
        """Raise RetrievalError unless `embedding_model` is None or the model this database was embedded with."""
        if embedding_model is not None and embedding_model != self.manifest.embedding_model:
            raise RetrievalError(
                f"task DB{self._where()} was embedded with {self.manifest.embedding_model!r} "
                f"({self.manifest.embedding_dim}-d); vectors from {embedding_model!r} cannot be compared with it"
            )

    def _queries(self, vectors: object, embedding_model: str | None) -> np.ndarray:
        self.check_model(embedding_model)
        arr = np.asarray(vectors, dtype=np.float32)
        width = arr.shape[-1] if arr.ndim else 0
        if width != self.manifest.embedding_dim:
            raise RetrievalError(
                f"query vectors have dimension {width}, but task DB{self._where()} holds "
                f"{self.manifest.embedding_dim}-d vectors of {self.manifest.embedding_model!r}: embed queries "
                "with that model"
            )
        return as_matrix(arr, self.manifest.embedding_dim, what="query vectors")

    def _where(self) -> str:
        return f" {self.path}" if self.path else ""

    def members(self, cluster_id: int) -> tuple[list[str], np.ndarray]:
        """The texts and unit vectors of a cluster's members: its type names, then its examples."""
        got = self._members.get(cluster_id)
        if got is None:
            if self._cluster_examples is None:
                by: dict[int, list[int]] = {}
                for e in self.examples:
                    by.setdefault(self.types[e.type].cluster, []).append(e.id)
                self._cluster_examples = by
            tids = self.clusters[cluster_id].types
            eids = self._cluster_examples.get(cluster_id, [])
            texts = [self.types[i].text for i in tids] + [self.examples[i].text for i in eids]
            vecs = np.vstack([self._type_index.vectors(tids), self._example_index.vectors(eids)])
            got = self._members[cluster_id] = (texts, vecs)
        return got

    def nearest_task_types(
        self, vectors: object, k: int = 1, *, embedding_model: str | None = None
    ) -> list[list[TypeHit]]:
        """For each query vector, the k nearest task-type clusters (distinct), nearest first (see the module
        docstring for the distance). Fewer than k when the DB has fewer.

        Candidates are the clusters of the nearest type names and examples (HNSW) and of the nearest centroids
        (exact); each candidate's nearest member is then found exactly among its members.
        """
        q = _unit(self._queries(vectors, embedding_model))
        w = self.manifest.parameters.member_weight
        out: list[list[TypeHit]] = []
        n_clusters = len(self.clusters)
        for row in q:
            want = min(k, n_clusters)
            if want <= 0:
                out.append([])
                continue
            wide = max(4 * want, 32)
            centre = self._centroids @ row
            candidates = set(np.argsort(-centre, kind="stable")[:wide].tolist())
            labels, _ = self._type_index.query(row, wide)
            candidates.update(self.types[i].cluster for i in labels[0].tolist())
            labels, _ = self._example_index.query(row, wide)
            candidates.update(self.types[self.examples[i].type].cluster for i in labels[0].tolist())
            scored = []
            for cid in candidates:
                texts, vecs = self.members(cid)
                sims = vecs @ row
                best = int(np.argmax(sims))
                score = w * float(sims[best]) + (1.0 - w) * float(centre[cid])
                scored.append((-score, cid, texts[best], 1.0 - float(sims[best])))
            scored.sort()
            out.append([TypeHit(cluster=cid, name=self.clusters[cid].name, distance=max(1.0 + neg, 0.0),
                                matched=text, matched_distance=max(dist, 0.0))
                        for neg, cid, text, dist in scored[:want]])
        return out

    def cluster(self, cluster_id: int) -> Cluster:
        if not 0 <= cluster_id < len(self.clusters):
            raise RetrievalError(f"no task-type cluster {cluster_id} (the DB has {len(self.clusters)})")
        return self.clusters[cluster_id]

    def constraint_pool(self, cluster_id: int) -> list[ConstraintEntry]:
        """The constraints of every task in the cluster, unique, by ascending id."""
        return [self.constraints[i] for i in self.cluster(cluster_id).constraints]

    def constraint_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored unit vectors of the given constraint ids."""
        return self._constraint_index.vectors(ids)

    def constraint_id(self, text: str) -> int | None:
        """The id of a constraint by its text (compared normalised), or None."""
        return self._constraint_ids.get(normalise(text))

    def nearest_constraints(
        self,
        vectors: object,
        k: int = 5,
        *,
        exclude: Iterable[int | str] = (),
        embedding_model: str | None = None,
    ) -> list[list[ConstraintHit]]:
        """For each query vector, the k nearest constraints of the whole DB, skipping `exclude` (ids, or texts
        compared normalised). Ties in distance go to the lower id."""
        q = self._queries(vectors, embedding_model)
        skip = self._exclude_ids(exclude)
        n = self._constraint_index.count
        out: list[list[ConstraintHit]] = []
        for row in q:
            kk = min(n, k + len(skip))
            labels, dists = self._constraint_index.query(row, kk)
            out.append(self._hits(labels[0], dists[0], skip, k))
        return out

    def nearest_in_pool(
        self,
        cluster_id: int,
        vectors: object,
        k: int = 5,
        *,
        exclude: Iterable[int | str] = (),
        embedding_model: str | None = None,
    ) -> list[list[ConstraintHit]]:
        """Like `nearest_constraints`, restricted to one cluster's pool and exact (pools are small): the Replace
        operation of the TCIA search."""
        q = self._queries(vectors, embedding_model)
        skip = self._exclude_ids(exclude)
        ids = np.asarray(self.cluster(cluster_id).constraints, dtype=np.int64)
        pv = self._pool_vectors.get(cluster_id)
        if pv is None:
            pv = self._pool_vectors[cluster_id] = self._constraint_index.vectors(ids)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        dist = 1.0 - qn @ pv.T if ids.size else np.empty((q.shape[0], 0), np.float32)
        out = []
        for row in dist:
            order = np.lexsort((ids, row))  # by distance, then id
            out.append(self._hits(ids[order], row[order], skip, k))
        return out

    def _exclude_ids(self, exclude: Iterable[int | str]) -> set[int]:
        skip: set[int] = set()
        for item in exclude:
            if isinstance(item, str):
                cid = self.constraint_id(item)
                if cid is not None:
                    skip.add(cid)
            else:
                skip.add(int(item))
        return skip

    def _hits(self, labels: np.ndarray, dists: np.ndarray, skip: set[int], k: int) -> list[ConstraintHit]:
        pairs = sorted((float(d), int(i)) for i, d in zip(labels.tolist(), dists.tolist()) if int(i) not in skip)
        hits = []
        for dist, i in pairs[:k]:
            c = self.constraints[i]
            hits.append(ConstraintHit(id=i, text=c.text, category=c.category, distance=dist))
        return hits

    # ---- statistics ------------------------------------------------------------------------------------------

    def stats(self, top: int = 20) -> dict[str, object]:
        """The paper's corpus statistics: task types by number of queries (with unique constraints per unique
        base query), the category mix of constraints, the share of non-complex prompts; and, when the corpus
        labelled its lines with kinds of work, the clusters' agreement with them as the manifest holds it (else
        None), with each listed cluster's most frequent kind."""
        c = self.manifest.counts
        ranked = sorted(self.clusters, key=lambda cl: (-cl.queries, cl.id))
        top_types = [
            {"cluster": cl.id, "task_type": cl.name, "queries": cl.queries, "member_types": len(cl.types),
             "unique_base_queries": cl.base_queries, "unique_constraints": len(cl.constraints),
             "constraints_per_base_query": round(len(cl.constraints) / cl.base_queries, 3) if cl.base_queries else 0.0,
             "kind": self.cluster_kind(cl.id)}
            for cl in ranked[:top]
        ]
        mentions: Counter[str] = Counter()
        unique: Counter[str] = Counter()
        for con in self.constraints:
            mentions[con.category] += con.count
            unique[con.category] += 1
        total = sum(mentions.values()) or 1
        ratios = [len(cl.constraints) / cl.base_queries for cl in self.clusters if cl.base_queries]
        return {
            "records": c.records,
            "non_complex": c.non_complex,
            "non_complex_share": round(c.non_complex / c.records, 4) if c.records else 0.0,
            "tasks": c.tasks,
            "task_types": c.task_types,
            "clusters": c.clusters,
            "singleton_clusters": c.singleton_clusters,
            "constraints": c.constraints,
            "constraint_mentions": c.constraint_mentions,
            "constraints_per_base_query_median": round(float(np.median(ratios)), 3) if ratios else 0.0,
            "category_mix": {cat: {"mentions": mentions[cat], "share": round(mentions[cat] / total, 4),
                                   "unique": unique[cat]}
                             for cat in sorted(mentions, key=lambda x: (-mentions[x], x))},
            "top_task_types": top_types,
            "label_agreement": msgspec.to_builtins(self.manifest.agreement),
        }


    def cluster_kinds(self, cluster_id: int) -> dict[str, int]:
        """The kinds of work of the cluster's labelled tasks, with their counts."""
        votes: Counter[str] = Counter()
        for i in self.cluster(cluster_id).types:
            votes.update(self.types[i].kinds)
        return dict(votes)

    def cluster_kind(self, cluster_id: int) -> str | None:
        """The most frequent kind of work among the cluster's labelled tasks (ties: alphabetical), or None."""
        votes = self.cluster_kinds(cluster_id)
        return min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0] if votes else None


def _read_rows(path: Path, typ: type) -> list:
    dec = msgspec.json.Decoder(typ)
    rows = []
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    try:
                        rows.append(dec.decode(raw))
                    except msgspec.DecodeError as exc:
                        raise RetrievalError(f"{path}:{lineno}: {exc} (truncated or damaged; rebuild the "
                                             "database)") from None
    except FileNotFoundError:
        raise RetrievalError(f"{path}: missing; rebuild the database") from None
    except OSError as exc:
        raise RetrievalError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    for i, row in enumerate(rows):
        if row.id != i:
            raise RetrievalError(f"{path}:{i + 1}: id {row.id} out of order; rebuild the database")
    return rows


def _read_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            arr = np.load(fh, allow_pickle=False)
    except FileNotFoundError:
        raise RetrievalError(f"{path}: missing; rebuild the database") from None
    except (OSError, ValueError, EOFError) as exc:
        raise RetrievalError(f"{path}: not a readable matrix ({exc}); rebuild the database") from None
    if arr.shape != shape or arr.dtype != np.float32:
        raise RetrievalError(f"{path}: a {arr.dtype} matrix of shape {arr.shape}, expected float32 {shape}; "
                             "rebuild the database")
    return arr


def _check_references(d: Path, types: list[TaskType], clusters: list[Cluster], constraints: list[ConstraintEntry],
                      examples: list[Example]) -> None:
    """Every id one file gives must exist in the file it points to: a file cut short at a line boundary still
    decodes, and would otherwise fail later as an IndexError in a query."""
    for t in types:
        if not 0 <= t.cluster < len(clusters):
            raise RetrievalError(f"{d / 'types.jsonl'}:{t.id + 1}: cluster {t.cluster}, but "
                                 f"{d / 'clusters.jsonl'} holds {len(clusters)} clusters (truncated?); rebuild "
                                 "the database")
    for cl in clusters:
        bad_type = next((i for i in cl.types if not 0 <= i < len(types) or types[i].cluster != cl.id), None)
        bad_con = next((i for i in cl.constraints if not 0 <= i < len(constraints)), None)
        if not cl.types or bad_type is not None or bad_con is not None:
            what = "no member type" if not cl.types else (
                f"type {bad_type}" if bad_type is not None else f"constraint {bad_con}")
            raise RetrievalError(f"{d / 'clusters.jsonl'}:{cl.id + 1}: {what} does not match types.jsonl and "
                                 "constraints.jsonl; rebuild the database")
    if sum(len(cl.types) for cl in clusters) != len(types):
        raise RetrievalError(f"{d / 'clusters.jsonl'}: its clusters do not hold every task type (truncated?); "
                             "rebuild the database")
    for e in examples:
        if not 0 <= e.type < len(types):
            raise RetrievalError(f"{d / 'examples.jsonl'}:{e.id + 1}: type {e.type} is not in types.jsonl; "
                                 "rebuild the database")
