"""Embeddings packing: many small embeddings requests of one model ride in shared API calls.

Entries submitted in the same turn of the event loop for the same (endpoint, model, parameters) are packed into
one `/v1/embeddings` call with a list `input`, up to `max_inputs` inputs and `max_tokens` estimated tokens per
call, then the answer's `data` is cut back into each entry's slice (in input order) with its share of the usage.
An entry larger than the bounds travels alone. When a packed call is refused as a whole (400, 413, 422, ...),
its entries are retried one call each so that only the offending entry fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from tcia_async.engine.errors import RequestFailed, RunStopped


class Entry:
    """One embeddings request to pack: `inputs` (a list), its token estimate, and where its answer goes."""

    __slots__ = ("inputs", "tokens", "future")

    def __init__(self, inputs: list[Any], tokens: int, future: asyncio.Future) -> None:
        self.inputs = inputs
        self.tokens = tokens
        self.future = future


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


# send(body_bytes, n_inputs, tokens) -> parsed response dict; raises RequestFailed / RunStopped
SendFn = Callable[[bytes, int], Awaitable[dict[str, Any]]]


class Packer:
    """Packs entries for one (endpoint, model, parameters). `spawn` starts a call in the engine's task group."""

    def __init__(self, params: dict[str, Any], send: Callable[[bytes, int], Awaitable[dict[str, Any]]],
                 spawn: Callable[..., None], max_inputs: int, max_tokens: int) -> None:
        self._params = params  # the body without "input"
        self._send = send
        self._spawn = spawn
        self._max_inputs = max(1, max_inputs)
        self._max_tokens = max(1, max_tokens)
        self._open: list[Entry] = []
        self._open_inputs = 0
        self._open_tokens = 0
        self._scheduled = False

    def submit(self, inputs: list[Any], tokens: int) -> asyncio.Future:
        """Queue an entry; the future resolves to its `PackResult` or raises RequestFailed / RunStopped."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        n = len(inputs)
        if self._open and (self._open_inputs + n > self._max_inputs or self._open_tokens + tokens > self._max_tokens):
            self._close()
        self._open.append(Entry(inputs, tokens, fut))
        self._open_inputs += n
        self._open_tokens += tokens
        if self._open_inputs >= self._max_inputs or self._open_tokens >= self._max_tokens:
            self._close()
        elif not self._scheduled:
            # Close at the end of this turn of the loop: every caller already woken gets to join first.
            self._scheduled = True
            loop.call_soon(self._close_scheduled)
        return fut

    def _close_scheduled(self) -> None:
        self._scheduled = False
        if self._open:
            self._close()

    def _close(self) -> None:
        entries = self._open
        self._open = []
        self._open_inputs = 0
        self._open_tokens = 0
        self._spawn(self._run, entries)

    async def _run(self, entries: list[Entry]) -> None:
        try:
            await self._call(entries)
        except BaseException as exc:
            # Never leave a waiter hanging: cancellation included.
            err = exc if isinstance(exc, (RequestFailed, RunStopped)) else RunStopped("embeddings call abandoned")
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(err)
            if not isinstance(exc, (RequestFailed, RunStopped)):
                raise

    async def _call(self, entries: list[Entry]) -> None:
        inputs: list[Any] = []
        for e in entries:
            inputs.extend(e.inputs)
        body = dict(self._params)
        body["input"] = inputs
        tokens = sum(e.tokens for e in entries)
        try:
            answer = await self._send(orjson.dumps(body), tokens)
        except RequestFailed as exc:
            if len(entries) > 1 and not exc.retryable:
                # One bad entry must not fail its neighbours: send each alone.
                for e in entries:
                    self._spawn(self._run, [e])
                return
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        data = answer.get("data")
        if not isinstance(data, list) or len(data) != len(inputs):
            exc = RequestFailed.make("invalid_response", f"embeddings answer has {len(data) if isinstance(data, list) else 'no'} "
                                     f"items for {len(inputs)} inputs", 200, 1, retryable=True)
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        if any(d.get("index") != i for i, d in enumerate(data) if isinstance(d, dict)):
            data = sorted(data, key=lambda d: d.get("index", 0))
        usage = answer.get("usage") or {}
        total = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        model = answer.get("model") or self._params.get("model", "")
        pos = 0
        given = 0
        for k, e in enumerate(entries):
            n = len(e.inputs)
            part = data[pos:pos + n]
            for j, d in enumerate(part):
                d["index"] = j
            pos += n
            # Usage apportioned by the token estimate; the last entry takes the rounding rest.
            share = total - given if k == len(entries) - 1 else (total * e.tokens // tokens if tokens else 0)
            given += share
            if not e.future.done():
                e.future.set_result(PackResult(part, share, model))
