"""Deterministic embeddings from hashed word n-grams: texts that share words are near in cosine.

Each word unigram and bigram (lower-cased, on `\\w+` runs) adds ±1, each character trigram of a longer word
±0.4, to one of `dim` buckets chosen by a stable hash (CRC-32, identical in every process, unlike Python's
salted `hash`); the vector is then L2-normalised.
Token arrays are treated the same way with token ids as words. Unrelated texts land near 0 cosine, identical
texts at 1, and the cosine grows with the share of common n-grams.
"""

from __future__ import annotations

import itertools
import re
from zlib import crc32

import numpy as np

_WORD = re.compile(r"\w+")
_CHAR_WEIGHT = 0.4  # character trigrams blur spelling variants without drowning the words
_memo: dict[tuple, np.ndarray] = {}
_MEMO_MAX = 20_000


def _grams(item: str | list[int]) -> tuple[list[bytes], int]:
    """Word unigrams and bigrams, then character trigrams of the words (so "summarise" ~ "summarize");
    returns the grams and how many of them are word grams."""
    words = _WORD.findall(item.lower()) if isinstance(item, str) else [str(t) for t in item]
    grams = [w.encode() for w in words]
    grams += [f"{a} {b}".encode() for a, b in itertools.pairwise(words)]
    n_words = len(grams)
    if isinstance(item, str):
        grams += [f"#{w[i:i + 3]}".encode() for w in words if len(w) > 3 for i in range(len(w) - 2)]
    return grams, n_words


def embed(item: str | list[int], dim: int) -> np.ndarray:
    """The unit float32 vector of one text (or token array) in `dim` dimensions."""
    key = (item if isinstance(item, str) else tuple(item), dim)
    v = _memo.get(key)
    if v is not None:
        return v
    grams, n_words = _grams(item)
    v = np.zeros(dim, dtype=np.float32)
    if grams:
        hashes = np.fromiter((crc32(g) for g in grams), dtype=np.uint64, count=len(grams))
        signs = np.where(hashes & 1, 1.0, -1.0).astype(np.float32)
        signs[n_words:] *= _CHAR_WEIGHT
        np.add.at(v, (hashes >> 1) % dim, signs)
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        v[0] = 1.0  # empty text: a fixed unit vector, so cosine stays defined
    else:
        v /= norm
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()
    _memo[key] = v
    return v
