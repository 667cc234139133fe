"""The engine's public exceptions and its counters."""

from __future__ import annotations

import msgspec

from tcia_async.records import ErrorOut


class RequestFailed(Exception):
    """A recorded failure of one request (`error` is what goes into its result line). The run goes on.

    `retryable` says whether the last attempt failed for a transient reason (attempts ran out) rather than
    a final verdict such as 400.
    """

    def __init__(self, error: ErrorOut, retryable: bool = False) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.retryable = retryable

    @classmethod
    def make(cls, code: str, message: str, status: int | None = None, attempts: int = 0,
             retryable: bool = False) -> RequestFailed:
        return cls(ErrorOut(code=code, message=message, status=status, attempts=attempts), retryable)


class RunStopped(Exception):
    """The provider refused the whole run (quota exhausted, key rejected): stop cleanly, keep state, rerun later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotSent(Exception):
    """The engine was halted (`Engine.halt`, the CLI's first Ctrl-C) before this request went out: it has no
    answer and no result; a rerun sends it."""


class EngineStats(msgspec.Struct, kw_only=True):
    """Counters of one Engine. `ok`/`failed` count requests (a cached answer is `ok` and `cached`); `sent` counts
    HTTP attempts, `retries` attempts after the first, `rate_limited` 429 answers; tokens and cost are what the
    network answers reported (cached answers cost nothing)."""

    sent: int = 0
    cached: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: int = 0
    cost: float = 0.0
