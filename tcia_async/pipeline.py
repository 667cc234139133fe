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

`stats` holds, per stage, items in, out, failed and in flight, and the times (seconds since the start) of its
first and last output, plus outputs per second of the run for the timeline plot.
"""

from __future__ import annotations

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
    def __init__(self, name: str, fn: StageFn, workers: int = 1, buffer: int | None = None) -> None:
        self.name = name
        self.fn = fn
        self.workers = max(1, workers)
        self.buffer = buffer if buffer is not None else max(16, 2 * self.workers)


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
                for _ in range(stage.workers):
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

    async def _work(self, index: int, recv: MemoryObjectReceiveStream, send: MemoryObjectSendStream | None
                    ) -> None:
        from tcia_async.engine import NotSent, RunStopped

        stage = self.stages[index]
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

        async with recv:
            try:
                async for item in recv:
                    st.items_in += 1
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
            finally:
                if send is not None:
                    await send.aclose()
