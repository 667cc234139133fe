"""A fake clock for the rate limiter: time moves only when every task is blocked (an "autojump" clock).

    clock = FakeClock()
    budget = Budget(Limits(rps=2), clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        await budget.acquire()          # waits in fake time: returns at once in real time
        tg.cancel_scope.cancel()
"""

from __future__ import annotations

import anyio

from tcia_async.engine.limits import Clock


class FakeClock(Clock):
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._sleepers: list[list] = []  # [deadline, event]
        self._new = anyio.Event()

    def now(self) -> float:
        return self.t

    async def wait(self, event: anyio.Event, timeout: float) -> None:
        entry = [self.t + timeout, event]
        self._sleepers.append(entry)
        self._new.set()
        try:
            await event.wait()
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for deadline, event in list(self._sleepers):
            if deadline <= self.t:
                event.set()

    async def autojump(self) -> None:
        """Whenever every other task is blocked, jump to the earliest deadline and wake its sleeper."""
        while True:
            await anyio.wait_all_tasks_blocked()
            live = [s for s in self._sleepers if not s[1].is_set()]
            if not live:
                self._new = anyio.Event()
                await self._new.wait()
                continue
            self.advance(max(0.0, min(s[0] for s in live) - self.t))
