"""OpenAI's prompt caching, emulated: how many prompt tokens a chat request would be served from the cache.

OpenAI caches prompt prefixes of 1,024 tokens or more and reports the matched prefix in 128-token steps as
`usage.prompt_tokens_details.cached_tokens`; an unused prefix expires after a few minutes. Here a prefix is a run
of whole messages (a chain of hashes, one per message) plus, in the first message that differs, the lines it
shares with the message that last followed the same context (the static framing before a stage's item). So a
stage call after the first of its kind reports its system prompt (and the framing) as cached once that is 1,024
tokens or more.

Memory is bounded: at most `max_prefixes` chain hashes and `max_heads` message heads of at most `head_chars`
characters each (about 16 MB at worst with the defaults), least recently used first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from tcia_async.sim import tokens

MIN_TOKENS = 1024  # OpenAI caches no shorter prefix
STEP = 128  # and reports the match in steps of this many tokens


class PromptCache:
    """The prefixes seen recently, per model. Not thread-safe: one per server, used from its event loop."""

    def __init__(self, ttl_s: float = 300.0, max_prefixes: int = 16384, max_heads: int = 1024,
                 head_chars: int = 16384, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_prefixes = max_prefixes
        self.max_heads = max_heads
        self.head_chars = head_chars
        self._clock = clock
        self._prefixes: OrderedDict[int, float] = OrderedDict()  # chain hash through a message -> last use
        # chain hash before a message -> (role, name, head of the message that last followed, time)
        self._heads: OrderedDict[int, tuple] = OrderedDict()
        self._line_tokens: dict[tuple, int] = {}  # (length, hash) of a shared head -> its tokens

    def clear(self) -> None:
        self._prefixes.clear()
        self._heads.clear()
        self._line_tokens.clear()

    def cached_tokens(self, model: str, messages: list, prompt_tokens: int) -> int:
        """The cached part of this request's prompt (0, or a multiple of STEP from MIN_TOKENS up), and remember
        its prefixes for the requests after it. `prompt_tokens` is the request's count (tokens.count_messages)."""
        if prompt_tokens < MIN_TOKENS:  # nothing this short can match, nor be matched later
            return 0
        now = self._clock()
        oldest = now - self.ttl_s
        prefixes, heads = self._prefixes, self._heads
        key = hash(("prompt-cache", model))
        pos = 0  # prompt tokens before the current message (tokens.count_messages' per-message formula)
        cached = 0
        matching = True
        for m in messages:
            if type(m) is not dict:
                continue
            role = m.get("role")
            name = m.get("name")
            text = tokens._content_text(m.get("content"))
            size = 4 + tokens.count(text) + (1 if "name" in m else 0)
            chained = hash((key, role, name, text))
            if matching:
                seen = prefixes.get(chained)
                if seen is not None and seen >= oldest:
                    cached = pos + size
                else:
                    matching = False
                    head = heads.get(key)
                    if head is not None and head[0] == role and head[1] == name and head[3] >= oldest:
                        cached = pos + 3 + self._shared_tokens(head[2], text)
            prefixes[chained] = now
            prefixes.move_to_end(chained)
            heads[key] = (role, name, text[: self.head_chars], now)
            heads.move_to_end(key)
            key = chained
            pos += size
        while len(prefixes) > self.max_prefixes:
            prefixes.popitem(last=False)
        while len(heads) > self.max_heads:
            heads.popitem(last=False)
        cached = min(cached, prompt_tokens)
        return cached - cached % STEP if cached >= MIN_TOKENS else 0

    def _shared_tokens(self, before: str, text: str) -> int:
        """Tokens of the whole lines `text` shares with `before` from its start (whole lines: a cut inside a
        token would miscount, and the shared framing recurs, so its count is memoised)."""
        n = _common_prefix_len(before, text)
        if n == len(text) == len(before):
            shared = text
        else:
            cut = text.rfind("\n", 0, n)
            if cut < 0:
                return 0
            shared = text[: cut + 1]
        k = (len(shared), hash(shared))
        count = self._line_tokens.get(k)
        if count is None:
            if len(self._line_tokens) >= 4096:
                self._line_tokens.clear()
            count = self._line_tokens[k] = tokens.count_once(shared)
        return count


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix of a and b: equal slices compared in C, halving the step at a mismatch."""
    n = min(len(a), len(b))
    i = 0
    step = 1024
    while step:
        while i + step <= n and a[i:i + step] == b[i:i + step]:
            i += step
        step //= 2
    return i
