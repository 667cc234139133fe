"""Shared fixtures. Every network test talks to the simulator on 127.0.0.1 only.

- `anyio_backend`: "asyncio" for `@pytest.mark.anyio` tests.
- `sim`: a running in-process Simulator (zero latency, no limits, no faults) for async tests;
  `sim.base_url`, `sim.stats()`, `sim.reset()`. For other settings: `async with Simulator(SimConfig(...))`.
- `sim_thread`: the same server on a background thread, for sync tests and subprocesses.
"""

from __future__ import annotations

import pytest

from tcia_async.sim import SimConfig, SimThread, Simulator


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sim(anyio_backend):
    async with Simulator(SimConfig(batch_delay_s=None)) as s:
        yield s


@pytest.fixture
def sim_thread():
    with SimThread(SimConfig(batch_delay_s=None)) as s:
        yield s
