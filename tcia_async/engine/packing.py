"""Embeddings packing: many small embeddings requests of one model ride in shared calls.

Entries submitted in the same turn of the event loop for the same (endpoint, model, parameters) are packed into
one call with a list `input`, up to `max_inputs` inputs and `max_tokens` estimated tokens, and the answer's
`data` is cut back into each entry's slice with its share of the usage. An entry larger than the bounds travels
alone. When a packed call is refused as a whole (400, 413, 422, ...), its entries are sent one call each, so that
only the offending entry fails.

A packed call runs in the engine's task group, not in any caller's: a caller that is cancelled leaves the call
going, and every answer it brings is handed to `on_answer` (the engine caches it) whoever still waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tcia_async.engine.errors import NotSent, RequestFailed, RunStopped


class PackResult:
    """An entry's share of a packed answer: its `data` items (re-indexed from 0), usage and the echoed model."""

    __slots__ = ("data", "prompt_tokens", "model")

    def __init__(self, data: list[dict[str, Any]], prompt_tokens: int, model: str) -> None:
        self.data = data
        self.prompt_tokens = prompt_tokens
        self.model = model

    def body(self) -> dict[str, Any]:
        """The answer as if this entry had been sent alone."""
        return {"object": "list", "data": self.data, "model": self.model,
                "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}}


class Entry:
    """One embeddings request to pack: its inputs, token estimate, cache key (or None) and its answer's future."""

    __slots__ = ("inputs", "tokens", "key", "stage", "priority", "future")

    def __init__(self, inputs: list[Any], tokens: int, key: bytes | None, stage: str, priority: int,
                 future: asyncio.Future) -> None:
        self.inputs = inputs
        self.tokens = tokens
        self.key = key
        self.stage = stage
        self.priority = priority
        self.future = future


# send(inputs, tokens, stage, priority) -> the parsed answer; raises RequestFailed / RunStopped / NotSent
SendFn = Callable[[list[Any], int, str, int], Awaitable[dict[str, Any]]]


class Packer:
    """Packs entries for one (endpoint, model, parameters). `spawn` starts a call in the engine's task group."""

    def __init__(self, model: str, send: SendFn, spawn: Callable[..., None], on_answer: Callable[[Entry, PackResult], None],
                 max_inputs: int, max_tokens: int) -> None:
        self._model = model
        self._send = send
        self._spawn = spawn
        self._on_answer = on_answer
        self._max_inputs = max(1, max_inputs)
        self._max_tokens = max(1, max_tokens)
        self._open: list[Entry] = []
        self._open_inputs = 0
        self._open_tokens = 0
        self._scheduled = False

    def submit(self, inputs: list[Any], tokens: int, key: bytes | None = None, stage: str = "",
               priority: int = 0) -> asyncio.Future:
        """Queue an entry; the future resolves to its `PackResult` or raises RequestFailed / RunStopped /
        NotSent."""
        loop = asyncio.get_running_loop()
        entry = Entry(inputs, tokens, key, stage, priority, loop.create_future())
        n = len(inputs)
        if self._open and (self._open_inputs + n > self._max_inputs or self._open_tokens + tokens > self._max_tokens):
            self._close()
        self._open.append(entry)
        self._open_inputs += n
        self._open_tokens += tokens
        if self._open_inputs >= self._max_inputs or self._open_tokens >= self._max_tokens:
            self._close()
        elif not self._scheduled:
            # Close when a task started now first runs: every caller already woken gets to join first.
            self._scheduled = True
            self._spawn(self._close_scheduled)
        return entry.future

    async def _close_scheduled(self) -> None:
        self._scheduled = False
        if self._open:
            await self._run(self._take())

    def _take(self) -> list[Entry]:
        entries = self._open
        self._open = []
        self._open_inputs = 0
        self._open_tokens = 0
        return entries

    def _close(self) -> None:
        self._spawn(self._run, self._take())

    async def _run(self, entries: list[Entry]) -> None:
        try:
            await self._call(entries)
        except BaseException as exc:
            # Never leave a waiter hanging. A cancelled call (the engine closing) was not answered: NotSent.
            err = exc if isinstance(exc, (RequestFailed, RunStopped, NotSent)) else NotSent()
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(err)
                    e.future.exception()  # retrieved: nobody may be waiting any more
            if not isinstance(exc, (RequestFailed, RunStopped, NotSent)):
                raise

    async def _call(self, entries: list[Entry]) -> None:
        inputs: list[Any] = []
        for e in entries:
            inputs.extend(e.inputs)
        tokens = sum(e.tokens for e in entries)
        try:
            answer = await self._send(inputs, tokens, entries[0].stage, max(e.priority for e in entries))
        except RequestFailed as exc:
            if len(entries) > 1 and not exc.retryable:
                for e in entries:  # one bad entry must not fail its neighbours: send each alone
                    self._spawn(self._run, [e])
                return
            raise
        data = answer.get("data")
        if not isinstance(data, list) or len(data) != len(inputs):
            raise RequestFailed.make("invalid_response", f"embeddings answer has "
                                     f"{len(data) if isinstance(data, list) else 'no'} items for {len(inputs)} "
                                     "inputs", 200, 1, retryable=True)
        if any(d.get("index") != i for i, d in enumerate(data) if isinstance(d, dict)):
            data = sorted(data, key=lambda d: d.get("index", 0))
        usage = answer.get("usage") or {}
        total = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        model = answer.get("model") or self._model
        pos = given = 0
        for k, e in enumerate(entries):
            part = data[pos:pos + len(e.inputs)]
            for j, d in enumerate(part):
                d["index"] = j
            pos += len(e.inputs)
            # Usage apportioned by the token estimate; the last entry takes the rounding rest.
            share = total - given if k == len(entries) - 1 else (total * e.tokens // tokens if tokens else 0)
            given += share
            result = PackResult(part, share, model)
            self._on_answer(e, result)  # cached now, even if its caller is gone
            if not e.future.done():
                e.future.set_result(result)
