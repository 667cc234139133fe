"""The streaming machinery: stages connected by bounded streams, a worker pool per stage, failures routed.

A `Stage` is an async function of one item that hands zero or more items to the next stage with `emit`. The
pipeline gives each stage a pool of workers reading from a bounded memory stream, so the first seed reaches the
last stage while later ones are still in the first, and memory stays bounded: a full stream holds back the stage
before it. There is no barrier between stages.

- An item whose stage raises `Skip`, `RequestFailed` or another `Exception` is handed to `on_failure` with the
  stage's name; the other items go on.
- `NotSent` (the engine was halted: Ctrl-C) drops the item quietly: a rerun does it.
- `RunStopped` (quota, auth, a provider failing on everything) ends the whole pipeline: `run` raises it.
- `stop_intake()` stops reading new input; items already inside finish.
- A stage with a `gate` (a `BatchGate`, its stand-in for the engine) runs in batch mode: it waits for all its
  inputs (a batch needs them all), runs every item at once, and whenever each unfinished item waits for an answer
  not in the cache, the waiting requests go to the provider's Batch API as one round; the items go on with the
  answers. Items still leave it one by one, as they finish.

`stats` holds, per stage, items in, out, failed and in flight, and the times (seconds since the start) of its
first and last output, plus outputs per second of the run for the timeline plot.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

Emit = Callable[[Any], Awaitable[None]]
StageFn = Callable[[Any, Emit], Awaitable[None]]


class Skip(Exception):
    """An item that cannot go on, for a reason that is not an error of the request (e.g. a seed without a task):
    recorded as a failure of its stage with `code`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class StageStats(msgspec.Struct, kw_only=True):
    name: str
    workers: int
    items_in: int = 0
    items_out: int = 0
    failed: int = 0
    in_flight: int = 0
    first_out_s: float | None = None
    last_out_s: float | None = None
    per_second: list[int] = []  # outputs in each second of the run


class Stage:
    def __init__(self, name: str, fn: StageFn, workers: int = 1, buffer: int | None = None,
                 gate: BatchGate | None = None) -> None:
        self.name = name
        self.fn = fn
        self.workers = max(1, workers)
        self.buffer = buffer if buffer is not None else max(16, 2 * self.workers)
        self.gate = gate


_ITEM: contextvars.ContextVar[int] = contextvars.ContextVar("tcia_pipeline_item", default=0)


class BatchGate:
    """The engine as a stage in batch mode sees it (a StageEngine). A chat whose answer is not in the cache waits;
    once every unfinished item of the stage is waiting, `submit` sends the waiting requests to the Batch API
    (engine/batch.py) and they go on, answered from the cache. A request the batches could not answer raises its
    RequestFailed (never sent online). Embeddings go online: they are cheap and fast."""

    def __init__(self, engine: Any, submit: Callable[[list[Any]], Awaitable[Any]]) -> None:
        self.engine = engine
        self.config = engine.config
        self._submit = submit
        self._wanted: dict[bytes, Any] = {}
        self._waiting: set[int] = set()  # items with a request waiting in this round
        self._running = 0
        self._quiet = anyio.Event()
        self._answered = anyio.Event()
        self.failures: dict[bytes, Any] = {}
        from tcia_async.engine.batch import BatchReplay

        self._replay = BatchReplay(engine, self.failures)  # raises what the batches could not answer
        self.rounds = 0
        self._halted = False
        self._scope: anyio.CancelScope | None = None

    def halt(self) -> None:
        """Stop waiting for batches (they stay at the provider: a rerun collects them); waiting calls end with
        NotSent."""
        self._halted = True
        if self._scope is not None:
            self._scope.cancel()
        self._answered.set()
        self._quiet.set()

    async def chat(self, body: dict[str, Any], sample: int = 0, *, stage: str = "", priority: int = 0
                   ) -> dict[str, Any]:
        from tcia_async.engine import NotSent
        from tcia_async.engine.batch import BatchItem
        from tcia_async.engine.request import CHAT

        key = self.engine.key(body, CHAT, sample)
        while True:
            if self._halted:
                raise NotSent()
            self._replay.check(key, body.get("model"), stage)
            if self.engine.requests.lookup(key) is not None:
                return await self.engine.chat(body, sample, stage=stage, priority=priority)
            self._wanted[key] = BatchItem(key, CHAT, body)
            self._waiting.add(_ITEM.get())
            answered = self._answered
            self._check()
            await answered.wait()

    async def chat_json(self, body: dict[str, Any], typ: type, **kw: Any) -> Any:
        from tcia_async.engine.core import ask_json

        return await ask_json(self.chat, self.config.schema_attempts, body, typ, **kw)

    async def embed(self, texts: Any, model: str, **kw: Any) -> Any:
        return await self.engine.embed(texts, model, **kw)

    def _check(self) -> None:
        if (self._wanted and len(self._waiting) >= self._running) or self._running == 0:
            self._quiet.set()

    async def run(self, items: list[Any], one: Callable[[Any], Awaitable[None]]) -> None:
        """Run `one(item)` for every item at once, and the rounds of batches their requests make."""

        async def item(i: int, it: Any) -> None:
            _ITEM.set(i)
            try:
                await one(it)
            finally:
                self._running -= 1
                self._waiting.discard(i)
                self._check()

        if not items:
            return
        async with anyio.create_task_group() as tg:
            self._running = len(items)
            for i, it in enumerate(items, 1):
                tg.start_soon(item, i, it)
            while not self._halted:
                await self._quiet.wait()
                self._quiet = anyio.Event()
                if not self._wanted or self._halted:
                    break  # every item is done
                wanted, self._wanted = list(self._wanted.values()), {}
                with anyio.CancelScope() as self._scope:
                    outcome = await self._submit(wanted)
                if self._halted:
                    break
                self.failures.update(outcome.failures)
                self.rounds += 1
                self._waiting.clear()
                answered, self._answered = self._answered, anyio.Event()
                answered.set()
                if self._running == 0:
                    break


class Pipeline:
    """See the module docstring. `on_failure(stage_name, item, exception)` records a failed item."""

    def __init__(self, stages: list[Stage], on_failure: Callable[[str, Any, BaseException], None]) -> None:
        self.stages = stages
        self.on_failure = on_failure
        self.stats = [StageStats(name=s.name, workers=s.workers) for s in stages]
        self.started = time.monotonic()
        self._intake = True
        self._intake_scope: anyio.CancelScope | None = None

    def stop_intake(self) -> None:
        self._intake = False
        if self._intake_scope is not None:
            self._intake_scope.cancel()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def run(self, source: Iterable[Any] | AsyncIterable[Any]) -> None:
        self.started = time.monotonic()
        streams = [anyio.create_memory_object_stream[Any](s.buffer) for s in self.stages]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._feed, source, streams[0][0])
            for i, stage in enumerate(self.stages):
                send_next = streams[i + 1][0] if i + 1 < len(streams) else None
                recv = streams[i][1]
                if stage.gate is not None:
                    tg.start_soon(self._batch_work, i, recv.clone(), send_next.clone() if send_next else None)
                for _ in range(stage.workers if stage.gate is None else 0):
                    tg.start_soon(self._work, i, recv.clone(), send_next.clone() if send_next else None)
                recv.close()
                if send_next is not None:
                    send_next.close()  # the workers hold clones: the stream ends when the last worker is done

    async def _feed(self, source: Iterable[Any] | AsyncIterable[Any], send: MemoryObjectSendStream) -> None:
        async with send:
            with anyio.CancelScope() as scope:
                self._intake_scope = scope
                if hasattr(source, "__aiter__"):
                    async for item in source:  # type: ignore[union-attr]
                        if not self._intake:
                            break
                        await send.send(item)
                else:
                    for item in source:  # type: ignore[union-attr]
                        if not self._intake:
                            break
                        await send.send(item)
                        await anyio.lowlevel.checkpoint()

    def _emitter(self, index: int, send: MemoryObjectSendStream | None) -> Emit:
        st = self.stats[index]

        async def emit(item: Any) -> None:
            now = self.elapsed()
            if st.first_out_s is None:
                st.first_out_s = now
            st.last_out_s = now
            second = int(now)
            while len(st.per_second) <= second:
                st.per_second.append(0)
            st.per_second[second] += 1
            st.items_out += 1
            if send is not None:
                await send.send(item)

        return emit

    async def _one(self, index: int, item: Any, emit: Emit) -> None:
        """One item through one stage: its failure recorded, a halt dropping it, a stop ending the pipeline."""
        from tcia_async.engine import NotSent, RunStopped

        stage = self.stages[index]
        st = self.stats[index]
        st.in_flight += 1
        try:
            await stage.fn(item, emit)
        except (RunStopped, anyio.get_cancelled_exc_class()):
            raise
        except NotSent:
            pass  # halted before its request went out: a rerun does it
        except Exception as exc:  # noqa: BLE001 - any failure of one item is recorded, the rest go on
            st.failed += 1
            self.on_failure(stage.name, item, exc)
        finally:
            st.in_flight -= 1

    async def _work(self, index: int, recv: MemoryObjectReceiveStream, send: MemoryObjectSendStream | None
                    ) -> None:
        emit = self._emitter(index, send)
        async with recv:
            try:
                async for item in recv:
                    self.stats[index].items_in += 1
                    await self._one(index, item, emit)
            finally:
                if send is not None:
                    await send.aclose()

    async def _batch_work(self, index: int, recv: MemoryObjectReceiveStream, send: MemoryObjectSendStream | None
                          ) -> None:
        gate = self.stages[index].gate
        assert gate is not None
        emit = self._emitter(index, send)
        async with recv:
            try:
                items = [item async for item in recv]  # a batch needs every input of the stage
                self.stats[index].items_in = len(items)
                await gate.run(items, lambda item: self._one(index, item, emit))
            finally:
                if send is not None:
                    await send.aclose()
