"""The task database: HNSW indexes, DBSCAN clustering on them, and the store the TCIA search retrieves from.

Pure: numpy vectors in, neighbours out. No network, no LLM, no engine; text is embedded by the caller.
"""

from tcia_async.retrieval.agreement import Agreement, label_agreement
from tcia_async.retrieval.dbscan import dbscan_hnsw, noise_to_singletons
from tcia_async.retrieval.index import IndexParams, RetrievalError, VectorIndex, as_matrix
from tcia_async.retrieval.store import (
    BuildParams,
    Cluster,
    ConstraintEntry,
    ConstraintHit,
    Counts,
    Example,
    Manifest,
    TaskDB,
    TaskDBBuilder,
    TaskType,
    TypeHit,
    normalise,
)

__all__ = [
    "Agreement", "BuildParams", "Cluster", "ConstraintEntry", "ConstraintHit", "Counts", "Example", "IndexParams",
    "Manifest", "RetrievalError", "TaskDB", "TaskDBBuilder", "TaskType", "TypeHit", "VectorIndex", "as_matrix",
    "dbscan_hnsw", "label_agreement", "noise_to_singletons", "normalise",
]
