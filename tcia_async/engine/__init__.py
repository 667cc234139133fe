"""The request engine: bulk, cached, rate-limited, retried requests to OpenAI-compatible APIs.

Knows nothing of TCIA. Public API: `Engine`, `EngineStats`, `RequestFailed`, `RunStopped`, `NotSent` (see core.py).
"""

from tcia_async.engine.core import Engine
from tcia_async.engine.errors import EngineStats, NotSent, RequestFailed, RunStopped

__all__ = ["Engine", "EngineStats", "NotSent", "RequestFailed", "RunStopped"]
