"""An OpenAI-compatible simulator server (tests, benchmarks, the offline demo). Imports nothing of tcia_async
but itself. Every answer it gives says it is simulated."""

from tcia_async.sim.config import SimConfig
from tcia_async.sim.server import SimThread, Simulator

__all__ = ["SimConfig", "SimThread", "Simulator"]
