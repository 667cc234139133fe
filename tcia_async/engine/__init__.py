"""The request engine: bulk, cached, rate-limited, retried requests to OpenAI-compatible APIs.

Knows nothing of TCIA. Public API: `Engine` (core.py), its exceptions and counters (errors.py), and the
`StageEngine` protocol a pipeline stage needs. docs/architecture.md follows one request through the modules.
"""

from tcia_async.engine.core import Engine, LocalEmbedder, StageEngine
from tcia_async.engine.errors import Counters, EngineStats, NotSent, RequestFailed, RunStopped

__all__ = ["Counters", "Engine", "EngineStats", "LocalEmbedder", "NotSent", "RequestFailed", "RunStopped",
           "StageEngine"]
