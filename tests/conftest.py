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


@pytest.fixture(scope="session")
def hashed_db(tmp_path_factory):
    """The shipped corpus's task database, embedded with the fast in-process `hashed` model (built once): for
    pipeline tests, which need a real database but not e5's quality (the shipped one has its own tests)."""
    import subprocess
    import sys
    from pathlib import Path

    data = Path(__file__).resolve().parent.parent / "tcia_async" / "data"
    out = tmp_path_factory.mktemp("hashed-db") / "db"
    subprocess.run([sys.executable, "-m", "tcia_async", "db", "build", str(data / "corpus.jsonl"),
                    "--decompositions", str(data / "decompositions.jsonl"), "--embedding-model", "hashed",
                    "--out", str(out), "--quiet"], check=True, capture_output=True, timeout=300)
    return out
