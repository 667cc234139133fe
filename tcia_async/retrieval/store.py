"""The task database: decomposed instructions grouped into task-type clusters, each owning a pool of constraints.

Built in two steps so that this module stays pure (vectors in, neighbours out):
1. `TaskDBBuilder.add(decomposition)` for every decomposed instruction (any order);
2. the caller embeds `builder.type_texts()` and `builder.constraint_texts()` with one embedding model and calls
   `TaskDB.build(builder, type_vectors, constraint_vectors, ...)`, which clusters the task types (DBSCAN on
   HNSW, noise -> singleton types), builds the two HNSW indexes and the manifest.

On disk (`save(dir)` / `load(dir)`): `manifest.json`, `types.jsonl`, `clusters.jsonl`, `constraints.jsonl`,
`types.hnsw`, `constraints.hnsw` (each with a `.json` of index parameters). Ids are assigned in sorted order of
the normalised texts, so the same decompositions give the same database whatever order they arrived in.
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
from tcia_async.retrieval.dbscan import dbscan_hnsw, noise_to_singletons
from tcia_async.retrieval.index import IndexParams, RetrievalError, VectorIndex, as_matrix

FORMAT_VERSION = 1


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


class BuildParams(msgspec.Struct, kw_only=True):
    eps: float = 0.15
    min_samples: int = 2
    index: IndexParams = IndexParams()


class Manifest(msgspec.Struct, kw_only=True):
    """What a task DB was built from and how. Vectors of another model or dimension must not be queried."""

    format: int = FORMAT_VERSION
    embedding_model: str
    embedding_dim: int
    decompose_model: str = ""
    # True when decompositions and embeddings came from tcia-async's simulator, not a real model.
    simulated: bool = False
    # Simulator settings needed to embed queries the same way (dimension, seed); empty otherwise.
    simulator: dict[str, object] = {}
    corpus: str = ""
    corpus_hash: str = ""
    counts: Counts = msgspec.field(default_factory=Counts)
    parameters: BuildParams = msgspec.field(default_factory=BuildParams)
    # Lines of the corpus that could not be used (bad JSON, no instruction, failed decomposition).
    skipped: dict[str, int] = {}


class TaskType(msgspec.Struct, kw_only=True, frozen=True):
    id: int
    text: str
    cluster: int
    queries: int  # tasks of this type in the corpus


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


class TypeHit(msgspec.Struct, kw_only=True, frozen=True):
    cluster: int
    name: str
    distance: float
    matched: str  # the member type string that was nearest


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
    __slots__ = ("text", "queries", "bases", "constraints")

    def __init__(self, text: str) -> None:
        self.text = text
        self.queries = 0
        self.bases: set[int] = set()
        self.constraints: set[str] = set()


class _ConstraintAcc:
    __slots__ = ("text", "count", "categories")

    def __init__(self, text: str) -> None:
        self.text = text
        self.count = 0
        self.categories: Counter[str] = Counter()


class TaskDBBuilder:
    """Accumulates decompositions. Memory: the unique task types and constraints (texts and counts) and one
    64-bit hash per unique base query; not the records themselves."""

    def __init__(self) -> None:
        self._types: dict[str, _TypeAcc] = {}
        self._constraints: dict[str, _ConstraintAcc] = {}
        self.counts = Counts()
        self._frozen: tuple[list[str], list[str]] | None = None

    def add(self, decomposition: Decomposition) -> None:
        self._frozen = None
        c = self.counts
        c.records += 1
        if not decomposition.complex or not decomposition.tasks:
            c.non_complex += 1
        for task in decomposition.tasks:
            type_text = " ".join(task.task_type.split()) or "Unknown"
            key = normalise(type_text)
            acc = self._types.get(key)
            if acc is None:
                acc = self._types[key] = _TypeAcc(type_text)
            elif type_text < acc.text:  # the spelling kept does not depend on arrival order
                acc.text = type_text
            acc.queries += 1
            acc.bases.add(_h64(normalise(task.base_query)))
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


def _category(votes: Counter[str]) -> str:
    # Most frequent; ties go to the first in CATEGORIES order, then alphabetical, so the choice is stable.
    rank = {name: i for i, name in enumerate(CATEGORIES)}
    return min(votes.items(), key=lambda kv: (-kv[1], rank.get(kv[0], len(rank)), kv[0]))[0]


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
    ) -> None:
        self.manifest = manifest
        self.types = types
        self.clusters = clusters
        self.constraints = constraints
        self._type_index = type_index
        self._constraint_index = constraint_index
        self.path = path
        self._constraint_ids = {normalise(c.text): c.id for c in constraints}
        self._pool_vectors: dict[int, np.ndarray] = {}

    # ---- build / save / load ---------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        builder: TaskDBBuilder,
        type_vectors: object,
        constraint_vectors: object,
        *,
        embedding_model: str,
        params: BuildParams | None = None,
        decompose_model: str = "",
        corpus: str = "",
        corpus_hash: str = "",
        simulated: bool = False,
        simulator: dict[str, object] | None = None,
        skipped: dict[str, int] | None = None,
        threads: int = 1,
    ) -> TaskDB:
        """Cluster the task types and index types and constraints. Vector rows follow `builder.type_texts()` and
        `builder.constraint_texts()`. With `threads=1` the result is reproducible bit for bit."""
        params = params or BuildParams()
        type_keys, con_keys = builder._keys()
        tv = as_matrix(type_vectors, what="task-type vectors")
        cv = as_matrix(constraint_vectors, what="constraint vectors")
        if tv.shape[0] != len(type_keys):
            raise RetrievalError(f"{tv.shape[0]} task-type vectors for {len(type_keys)} task types")
        if cv.shape[0] != len(con_keys):
            raise RetrievalError(f"{cv.shape[0]} constraint vectors for {len(con_keys)} constraints")
        dims = {m.shape[1] for m in (tv, cv) if m.shape[0]}
        if len(dims) > 1:
            raise RetrievalError(f"task-type and constraint vectors differ in dimension: {sorted(dims)}")
        dim = dims.pop() if dims else max(tv.shape[1], cv.shape[1], 1)

        type_index = VectorIndex.build(tv if tv.shape[0] else np.empty((0, dim), np.float32), params.index,
                                       threads=threads)
        constraint_index = VectorIndex.build(cv if cv.shape[0] else np.empty((0, dim), np.float32), params.index,
                                             threads=threads)
        raw = dbscan_hnsw(tv, params.eps, params.min_samples, index=type_index, threads=threads) if len(type_keys) \
            else np.empty(0, np.int64)
        n_noise = int((raw < 0).sum())
        labels = noise_to_singletons(raw)

        con_id = {k: i for i, k in enumerate(con_keys)}
        accs = [builder._types[k] for k in type_keys]
        types = [TaskType(id=i, text=a.text, cluster=int(labels[i]), queries=a.queries) for i, a in enumerate(accs)]
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
                                         singleton_clusters=n_noise, constraints=len(constraints))
        manifest = Manifest(embedding_model=embedding_model, embedding_dim=dim, decompose_model=decompose_model,
                            simulated=simulated, simulator=dict(simulator or {}), corpus=corpus,
                            corpus_hash=corpus_hash, counts=counts, parameters=params, skipped=dict(skipped or {}))
        return cls(manifest, types, clusters, constraints, type_index, constraint_index)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the database into `directory` (created if needed). The manifest is written last, so a directory
        with a manifest holds a complete database."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)
        enc = msgspec.json.Encoder()
        for name, rows in (("types.jsonl", self.types), ("clusters.jsonl", self.clusters),
                           ("constraints.jsonl", self.constraints)):
            with open(d / name, "wb") as fh:
                for row in rows:
                    fh.write(enc.encode(row) + b"\n")
        self._type_index.save(d / "types.hnsw")
        self._constraint_index.save(d / "constraints.hnsw")
        (d / "manifest.json").write_bytes(msgspec.json.format(enc.encode(self.manifest)) + b"\n")
        self.path = d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TaskDB:
        """Read a database written by `save`. Raises RetrievalError naming the file when one is missing or bad."""
        d = Path(directory)
        if not d.is_dir():
            raise RetrievalError(f"{d}: no such database directory")
        if not (d / "manifest.json").exists():
            raise RetrievalError(f"{d}: not a task database (no manifest.json; was `db build` interrupted?)")
        try:
            manifest = msgspec.json.decode((d / "manifest.json").read_bytes(), type=Manifest)
        except msgspec.DecodeError as exc:
            raise RetrievalError(f"{d / 'manifest.json'}: {exc}") from None
        if manifest.format != FORMAT_VERSION:
            raise RetrievalError(f"{d}: task DB format {manifest.format}, this version reads {FORMAT_VERSION}")
        types = _read_rows(d / "types.jsonl", TaskType)
        clusters = _read_rows(d / "clusters.jsonl", Cluster)
        constraints = _read_rows(d / "constraints.jsonl", ConstraintEntry)
        type_index = VectorIndex.load(d / "types.hnsw")
        constraint_index = VectorIndex.load(d / "constraints.hnsw")
        if type_index.count != len(types) or constraint_index.count != len(constraints):
            raise RetrievalError(f"{d}: indexes and records disagree in size; rebuild the database")
        return cls(manifest, types, clusters, constraints, type_index, constraint_index, path=d)

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

    def nearest_task_types(
        self, vectors: object, k: int = 1, *, embedding_model: str | None = None
    ) -> list[list[TypeHit]]:
        """For each query vector, the k nearest task-type clusters (distinct), nearest first.

        A cluster's distance is that of its nearest member type string. Fewer than k when the DB has fewer.
        """
        q = self._queries(vectors, embedding_model)
        out: list[list[TypeHit]] = []
        n = self._type_index.count
        for row in q:
            want = min(k, len(self.clusters))
            kk = min(n, max(4 * want, 16))
            while True:
                labels, dists = self._type_index.query(row, kk)
                hits: list[TypeHit] = []
                seen: set[int] = set()
                for lab, dist in zip(labels[0].tolist(), dists[0].tolist()):
                    t = self.types[lab]
                    if t.cluster in seen:
                        continue
                    seen.add(t.cluster)
                    hits.append(TypeHit(cluster=t.cluster, name=self.clusters[t.cluster].name,
                                        distance=float(dist), matched=t.text))
                    if len(hits) == want:
                        break
                if len(hits) >= want or kk >= n:
                    out.append(hits)
                    break
                kk = min(n, kk * 4)
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
        base query), the category mix of constraints, the share of non-complex prompts."""
        c = self.manifest.counts
        ranked = sorted(self.clusters, key=lambda cl: (-cl.queries, cl.id))
        top_types = [
            {"cluster": cl.id, "task_type": cl.name, "queries": cl.queries, "member_types": len(cl.types),
             "unique_base_queries": cl.base_queries, "unique_constraints": len(cl.constraints),
             "constraints_per_base_query": round(len(cl.constraints) / cl.base_queries, 3) if cl.base_queries else 0.0}
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
        }


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
                        raise RetrievalError(f"{path}:{lineno}: {exc}") from None
    except FileNotFoundError:
        raise RetrievalError(f"{path}: missing; rebuild the database") from None
    for i, row in enumerate(rows):
        if row.id != i:
            raise RetrievalError(f"{path}:{i + 1}: id {row.id} out of order; rebuild the database")
    return rows
