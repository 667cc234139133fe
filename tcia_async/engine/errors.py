"""The engine's public exceptions and its counters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio
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
    """The provider refused the whole run (quota exhausted, key rejected, unreachable): stop cleanly, keep state,
    rerun later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotSent(Exception):
    """This request has no answer and no result, and a rerun sends it: the engine was halted (`Engine.halt`, the
    CLI's first Ctrl-C) or closed before it went out, or it was cut off the wire (`Engine.cut`)."""

    def __init__(self, message: str = "not sent: the engine was halted or closed before this request went out"
                 ) -> None:
        super().__init__(message)


def primary(error: BaseException) -> BaseException:
    """The exception an exception group stands for: a stop first, then an interrupt, then the first other error,
    leaving out the cancellations it caused in the group's other tasks. Anything else is itself."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(error)
    cancelled = anyio.get_cancelled_exc_class()
    for kinds in ((RunStopped,), (KeyboardInterrupt,), (Exception,)):
        for e in leaves:
            if isinstance(e, kinds) and not isinstance(e, cancelled):
                return e
    return leaves[0] if leaves else error


class Counters(msgspec.Struct, kw_only=True):
    """Counters of a set of requests. `ok`/`failed` count calls (a cached answer is `ok` and `cached`; a
    `chat_json` whose answers never matched counts its calls as `ok`: it raised `schema_mismatch`); `sent` counts
    HTTP attempts that reached the provider (a refused connection is not sent), `retries` every attempt after
    the first (connected or not), `rate_limited` 429 answers. Tokens and cost are
    what answers from the network reported (a cached answer costs nothing); `cached_tokens` is the part of
    `prompt_tokens` the provider served from its prompt cache, and `cost_full` the cost at full input price.
    `cost_replayed` is what the chat answers replayed from the cache cost when they were paid for (an earlier
    run's, or an identical request's): `cost + cost_replayed` is what the results cost to make.
    `wire_s` sums the time answered attempts spent on the wire.

    The Batch API (engine/batch.py): `batch_sent` counts lines uploaded in batch files (a resubmitted line
    again), `batch_ok` lines answered by a batch; their tokens and cost are in the totals above, and also in
    `batch_tokens` and `batch_cost` (at the batch discount); `batch_saved` is what they would have cost online
    minus what they cost. Online = the totals minus the batch part."""

    ok: int = 0
    cached: int = 0
    failed: int = 0
    sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    tokens: int = 0
    cost: float = 0.0
    cost_full: float = 0.0
    cost_replayed: float = 0.0
    wire_s: float = 0.0
    batch_sent: int = 0
    batch_ok: int = 0
    batch_tokens: int = 0
    batch_cost: float = 0.0
    batch_saved: float = 0.0
    batch_replayed: int = 0  # answers a batch of an earlier run gave, replayed from the cache

    def add_usage(self, prompt: int, completion: int, cached: int, cost: float, full: float) -> None:
        """One answer's tokens and its cost (`full`: at full input price)."""
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_tokens += cached
        self.tokens += prompt + completion
        self.cost += cost
        self.cost_full += full


def _sum(counters: Iterable[Counters]) -> Counters:
    out = Counters()
    for c in counters:
        for f in Counters.__struct_fields__:
            setattr(out, f, getattr(out, f) + getattr(c, f))
    return out


class EngineStats:
    """The engine's counters: one `Counters` per (stage, model) pair, which each request adds to once (the
    `stage=` of its call, "" when none was given); the totals (also as attributes: `stats.ok`), `stages` and
    `models` are sums made when read. `in_flight` is the number of requests on the wire now."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], Counters] = {}
        self.in_flight = 0

    def view(self, stage: str, model: str) -> Counters:
        """The counters a request of `stage` to `model` adds to."""
        c = self.pairs.get((stage, model))
        if c is None:
            c = self.pairs[(stage, model)] = Counters()
        return c

    def total(self) -> Counters:
        return _sum(self.pairs.values())

    def _by(self, i: int) -> dict[str, Counters]:
        groups: dict[str, list[Counters]] = {}
        for key, c in self.pairs.items():
            groups.setdefault(key[i], []).append(c)
        return {name: _sum(cs) for name, cs in groups.items()}

    @property
    def stages(self) -> dict[str, Counters]:
        return self._by(0)

    @property
    def models(self) -> dict[str, Counters]:
        return self._by(1)

    def __getattr__(self, name: str) -> Any:
        if name in Counters.__struct_fields__:
            return getattr(self.total(), name)
        raise AttributeError(name)

    def __str__(self) -> str:
        t = self.total()
        return (f"{t.ok} answered ({t.cached} from the cache), {t.failed} failed; {t.sent} requests sent, "
                f"{t.retries} retries, {t.rate_limited} answered 429; {t.tokens:,} tokens")

    def to_builtins(self) -> dict[str, Any]:
        """The totals, per stage and per model, as plain data (JSON)."""
        return {**msgspec.to_builtins(self.total()), "in_flight": self.in_flight,
                "stages": {k: msgspec.to_builtins(v) for k, v in self.stages.items()},
                "models": {k: msgspec.to_builtins(v) for k, v in self.models.items()}}
