"""The one request path: cache -> sharing -> an engine task -> budget -> slot -> wire -> verdict, with retries.

Every request of the engine goes through `Requests.call` (a request with its own cache key: chat, and the lines
of `generate`) or `Requests.exchange` (the network part alone: a packed embeddings call, whose entries are
cached one by one). In order, for one request:

1. cache: an answered key is returned without a network call;
2. sharing: when an identical key is already in flight, its answer is awaited instead of paid for again;
3. owner: the request is sent by a task of the engine, and its callers wait for the outcome. A caller that goes
   away (a timeout, a cancelled task, Ctrl-C) stops waiting at once; the request goes on, and its answer is
   cached, unless every caller left before it went on the wire (then it is not sent);
4. budget: its (provider, model) budget is paid (limits.py), waiting while holding nothing else, so a model
   under a tight limit never blocks another;
5. slot: one of `concurrency` connection slots, held only while the request is on the wire;
6. wire: the POST and its answer;
7. verdict: a 200 with a usable body is settled with its real usage, cached and handed to whoever shares the
   key; anything else follows retry.py: cool down, back off and retry, fail this request, or stop the run.

Waits before the wire (budget, slot, backoff) end with `NotSent` when `halt()` is called; `cut()` abandons the
requests on the wire too. generate's workers send their lines themselves (step 3 without a task: a worker is
cancelled only when its run stops; a caller sharing its request then sends it).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio
import orjson

from tcia_async.config import EngineConfig
from tcia_async.engine.cache import ResponseCache, key_prefix, request_key
from tcia_async.engine.client import NOT_CONNECTED, TRANSPORT_ERRORS, BodyTooLarge, Transport
from tcia_async.engine.errors import Counters, EngineStats, NotSent, RequestFailed, RunStopped
from tcia_async.engine.limits import WAIT, Budget, BudgetTooSmall, Limiter
from tcia_async.engine.retry import (COOLDOWN, FAIL, RETRY, STOP, Verdict, backoff, classify_status,
                                     invalid_body_verdict)
from tcia_async.engine.tokens import OutputEstimator, chat_prompt_bound_from_json, count_chat_prompt

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
SUPPORTED_URLS = (CHAT, EMBEDDINGS)


def unsupported_url(url: Any) -> str | None:
    """Why a Batch-format url cannot be sent, or None when it can."""
    return None if url in SUPPORTED_URLS else f"unsupported url {url!r} (supported: {', '.join(SUPPORTED_URLS)})"

_SORT = orjson.OPT_SORT_KEYS
# The request id of an answer the Batch API gave starts with this in the cache, so a replay can count its cost at
# the batch price.
BATCH_ID = "batch:"


def canonical(body: dict[str, Any]) -> bytes:
    """A body's canonical JSON (sorted keys): what is sent, and what its cache key is made from."""
    return orjson.dumps(body, option=_SORT)


class Answer(NamedTuple):
    raw: bytes  # the body as stored: one line of JSON
    body: dict[str, Any] | None  # parsed, when it came from the network (else parse `raw`)
    request_id: str
    shared: bool  # from the cache or from an identical request in flight
    replayed: bool = False  # from the cache: paid for by an earlier run or call

    def parsed(self) -> dict[str, Any]:
        return self.body if self.body is not None else orjson.loads(self.raw)


class Endpoint:
    """One base URL (or local model): its transport and the cache-key prefix of each URL path."""

    def __init__(self, transport: Transport | None, provider: str) -> None:
        self.transport = transport
        self.provider = provider
        self.prefixes = {p: key_prefix(provider, p) for p in SUPPORTED_URLS}
        self.urls = {p: transport.url(p) for p in SUPPORTED_URLS} if transport else {}

    def key(self, path: str, data: bytes, sample: int = 0) -> bytes:
        return request_key(self.prefixes[path], sample, data)


class Slots:
    """At most `n` holders at once; waiters are served by priority (higher first), then in arrival order."""

    def __init__(self, n: int) -> None:
        self.free = max(1, n)
        self._waiters: list[list[Any]] = []  # heap of [-priority, seq, event, granted]
        self._seq = 0

    def take(self) -> bool:
        """Take a slot without waiting, when one is free and nobody waits for one."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> bool:
        """Take a slot; True when it had to wait."""
        if self.take():
            return False
        self._seq += 1
        me = [-priority, self._seq, anyio.Event(), False]
        heapq.heappush(self._waiters, me)
        try:
            await me[2].wait()
        except BaseException:
            if me[3]:
                self.release()  # granted while being cancelled: pass it on
            else:
                self._waiters.remove(me)
                heapq.heapify(self._waiters)
            raise
        return True

    def release(self) -> None:
        if self._waiters:
            me = heapq.heappop(self._waiters)
            me[3] = True
            me[2].set()  # the slot goes straight to the next waiter
        else:
            self.free += 1


class _Waiter:
    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.outcome: tuple[bytes, dict[str, Any], str] | BaseException | None = None


class _Again(Exception):
    """The generate worker sending a request others wait for was stopped: they send it themselves."""


class _Flight:
    """One key in flight: who waits for it, and the scope of the engine task sending it (None when its caller
    sends it: generate's workers)."""

    __slots__ = ("key", "waiters", "scope", "wired")

    def __init__(self, key: bytes, scope: anyio.CancelScope | None = None) -> None:
        self.key = key
        self.waiters: list[_Waiter] = []
        self.scope = scope
        self.wired = False  # it went on the wire: it is paid for, and finishes whoever still waits


def usable(parsed: Any, chat: bool) -> bool:
    """Whether a 200's parsed body is an answer: a chat completion with a choice, or embeddings data."""
    if type(parsed) is not dict:
        return False
    if chat:
        choices = parsed.get("choices")
        return type(choices) is list and bool(choices) and type(choices[0]) is dict
    return type(parsed.get("data")) is list


def _count(c: Counters, answer: Answer | None) -> None:
    """Count one call as answered (shared: from the cache or an identical request) or failed (None)."""
    if answer is None:
        c.failed += 1
    else:
        c.ok += 1
        if answer.shared:
            c.cached += 1


def _one_line(raw: bytes, parsed: Any) -> bytes:
    # Results are JSONL and the cache stores what a result line embeds: no raw line breaks.
    return orjson.dumps(parsed) if (b"\n" in raw or b"\r" in raw) else raw


async def _in_scope(scopes: set[anyio.CancelScope], scope: anyio.CancelScope, fn: Callable[..., Awaitable[Any]],
                    *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in `scope`, kept in `scopes` while it runs (for `halt()` or `cut()` to cancel);
    NotSent when it is cancelled so."""
    with scope:
        scopes.add(scope)
        try:
            return await fn(*args, **kwargs)
        finally:
            scopes.discard(scope)
    raise NotSent()  # reached only when the scope was cancelled


class Requests:
    """The request path of one Engine (see the module docstring). Owns the endpoints, budgets, slots and the
    table of requests in flight; the cache and the stats are the engine's."""

    def __init__(self, config: EngineConfig, cache: ResponseCache | None, stats: EngineStats,
                 limiter: Limiter) -> None:
        self.config = config
        self.cache = cache
        self.stats = stats
        self.limiter = limiter
        self.slots = Slots(config.concurrency)
        self.estimator = OutputEstimator()
        self.stopped: str | None = None
        self._halted = False
        self._sending = 0  # requests the engine's own tasks are sending (`owned`; see settle)
        self._settled: anyio.Event | None = None
        self._inflight: dict[bytes, _Flight] = {}
        self._waits: set[anyio.CancelScope] = set()  # waits before the wire: cancelled by halt()
        self._owned: set[anyio.CancelScope] = set()  # requests the engine's tasks send: cancelled by cut()
        self.spawn: Callable[..., None] | None = None  # starts a task in the engine's task group
        self._failing_since: float | None = None  # first transient failure since the last real answer
        self._answered = False  # the provider has answered something (not a transient failure) in this run
        self._streak = 0  # which run of transient failures this is (one per _failing_since)
        self._streak_requests = 0  # how many requests failed in it
        self._secrets: list[str] = []
        self.batch_discount = 0.5  # the [batch] discount (Engine's): what a replayed batch answer cost
        self.paid_by_batch: set[bytes] = set()  # keys a batch answered (and counted) in this process
        self.chat_ep: Endpoint
        self.embed_ep: Endpoint

    async def open(self) -> None:
        cfg = self.config
        key, ekey = cfg.api_key(), cfg.api_key(embeddings=True)
        # Keys are scrubbed from messages; a key of a few characters (a local server's placeholder) would garble
        # ordinary words instead ("e***ceeded"), and no provider issues one.
        self._secrets = [s for s in (key, ekey) if s and len(s) >= 8]
        chat_t = Transport(cfg.base_url, key, cfg.concurrency, cfg.timeout, cfg.max_response_bytes)
        ebase = cfg.embedding_base_url or cfg.base_url
        embed_t = chat_t
        if ebase != cfg.base_url or ekey != key:
            embed_t = Transport(ebase, ekey, cfg.concurrency, cfg.timeout, cfg.max_response_bytes)
        await chat_t.open()
        if embed_t is not chat_t:
            await embed_t.open()
        self.chat_ep = Endpoint(chat_t, chat_t.provider)
        self.embed_ep = self.chat_ep if embed_t is chat_t else Endpoint(embed_t, embed_t.provider)

    async def close(self) -> None:
        for ep in {id(self.chat_ep): self.chat_ep, id(self.embed_ep): self.embed_ep}.values():
            if ep.transport is not None:
                await ep.transport.close()

    def endpoint(self, path: str) -> Endpoint:
        return self.embed_ep if path == EMBEDDINGS else self.chat_ep

    # -- stopping ---------------------------------------------------------------------------------------------

    @property
    def halted(self) -> bool:
        return self._halted

    async def settle(self) -> None:
        """Wait until the engine's own tasks send nothing (after `halt()`: until those on the wire end)."""
        while self._sending:
            self._settled = anyio.Event()
            await self._settled.wait()

    def halt(self) -> None:
        """Send nothing more: requests on the wire finish; waits for budget, a slot or a retry, and every later
        request, raise `NotSent`."""
        self._halted = True
        for scope in list(self._waits):
            scope.cancel()

    def cut(self) -> None:
        """Halt, and abandon the requests on the wire too (their answers are lost: a rerun sends them)."""
        self.halt()
        for scope in list(self._owned):
            scope.cancel()

    async def owned(self, fn: Callable[..., Awaitable[Any]], *args: Any, scope: anyio.CancelScope | None = None,
                    **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` run by an engine task, in a scope that `cut()` cancels (then NotSent)."""
        self._sending += 1
        try:
            return await _in_scope(self._owned, scope or anyio.CancelScope(), fn, *args, **kwargs)
        finally:
            self._sending -= 1
            if not self._sending and self._settled is not None:
                self._settled.set()

    async def _unless_halted(self, wait: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self._halted:
            raise NotSent()
        return await _in_scope(self._waits, anyio.CancelScope(), wait, *args)

    def _stop(self, code: str, status: int | None, message: str) -> RunStopped:
        if self.stopped is None:
            why = {
                "insufficient_quota": "the provider says the quota is used up (429 insufficient_quota)",
                "unauthorized": "the provider rejected the API key (401)",
                "forbidden": "the provider refused access (403)",
                "unreachable": "no connection to the provider",
                "failing": "the provider answered only errors (5xx, timeouts or broken answers)",
            }.get(code, f"the provider refused the run ({status} {code})")
            if code == "unauthorized" and not self.config.api_key():
                why = f"the provider wants an API key and none was sent (${self.config.api_key_env} is not set)"
            self.stopped = self.scrub(f"{why}: {message}".strip())
        return RunStopped(self.stopped)

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    # -- one request with a cache key -------------------------------------------------------------------------

    def lookup(self, key: bytes) -> Answer | None:
        if self.cache is None:
            return None
        hit = self.cache.get(key)
        return None if hit is None else Answer(hit[0], None, hit[1], True, True)

    async def call(self, path: str, body: dict[str, Any], data: bytes, key: bytes, *, stage: str = "",
                   priority: int = 0, check_cache: bool = True, inline: bool = False) -> Answer:
        """The answer to one request (`data` = canonical(body), `key` its cache key), through the whole path.
        Counts it as ok, cached or failed in the stats. `inline=True` sends it in the caller's task instead of an
        engine task (generate's workers: cancelled only when their run is abandoned)."""
        model = str(body.get("model") or "")
        counts = self.stats.view(stage, model)
        if check_cache:
            hit = self.lookup(key)
            if hit is not None:
                _count(counts, hit)
                return hit
        flight = self._inflight.get(key)
        shared = flight is not None  # an identical request is in flight: wait for it instead of paying twice
        if flight is None:
            ep = self.endpoint(path)
            budget = self.limiter.budget(ep.provider, model)
            tokens, fixed = self._reservation(budget, body, len(data), model) if budget.counts_tokens else (0.0, -1.0)
            # Nothing awaits between the cache lookup and marking the key in flight.
            flight = self._inflight[key] = _Flight(key, None if inline else anyio.CancelScope())
            args = (ep, path, data, budget, tokens, model)
            kwargs = {"fixed_out": fixed, "stage": stage, "priority": priority, "flight": flight}
            if inline:
                try:
                    raw, parsed, rid = await self.exchange(*args, **kwargs)
                except RequestFailed:
                    _count(counts, None)
                    raise
                answer = Answer(raw, parsed, rid, False)
                _count(counts, answer)
                return answer
            try:
                if self.spawn is None:
                    raise RuntimeError("the engine is not open: use it inside `async with Engine(...)`")
                self.spawn(self._send, flight, args, kwargs)
            except BaseException:
                del self._inflight[key]  # nobody sends it: a later caller must not wait for it
                raise
        me = _Waiter()
        flight.waiters.append(me)
        try:
            await me.event.wait()
        except BaseException:
            if me.outcome is None:  # the caller is gone before the outcome
                flight.waiters.remove(me)
                if not flight.waiters and not flight.wired and flight.scope is not None:
                    # Nobody waits and it is not on the wire yet: it is not sent. A later caller starts anew.
                    flight.scope.cancel()
                    if self._inflight.get(key) is flight:
                        del self._inflight[key]
            raise
        outcome = me.outcome
        if isinstance(outcome, BaseException):
            if isinstance(outcome, _Again):
                return await self.call(path, body, data, key, stage=stage, priority=priority)
            if isinstance(outcome, RequestFailed):
                _count(counts, None)
            raise outcome
        assert outcome is not None
        # A caller that shares the answer parses its own copy of the body.
        answer = Answer(outcome[0], None if shared else outcome[1], outcome[2], shared)
        _count(counts, answer)
        return answer

    async def _send(self, flight: _Flight, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """An engine task sending one keyed request; `exchange` hands the outcome to the callers waiting."""
        try:
            await self.owned(self.exchange, *args, scope=flight.scope, **kwargs)
        except Exception:  # noqa: BLE001 - already handed to the waiters
            pass

    def _reservation(self, budget: Budget, body: dict[str, Any], size: int, model: str) -> tuple[float, float]:
        """(tokens to reserve, output tokens charged whatever the answer, or -1 when the real completion counts).

        Providers charge `max_tokens` against TPM when a request is admitted (OpenAI's rate-limit guide), so
        with `max_tokens` the reservation is prompt + max_tokens and stays; without it the learned output
        estimate is reserved and settled with the real completion.
        """
        n = body.get("n") or 1
        n = n if type(n) is int and n >= 1 else 1
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        cap = cap if type(cap) is int and cap > 0 else 0
        # Far from the limit the exact prompt count changes no decision: a bound from the JSON's length will do
        # (settlement puts the provider's count in its place). Near the limit, count exactly.
        prompt = chat_prompt_bound_from_json(size)
        if prompt * 2 + cap * n > budget.token_headroom():
            prompt = count_chat_prompt(body)
        if cap:
            return float(prompt + cap * n), float(cap * n)
        guess = self.estimator.estimate(model, None) * n
        # A guess of the answer's length must not make a request larger than the whole budget: only the
        # prompt and an explicit max_tokens can. Settlement charges the real completion afterwards.
        whole = min(w.limit for w in budget.tokens)
        return float(prompt + min(guess, max(0.0, whole - prompt))), -1.0

    def _share(self, flight: _Flight, outcome: tuple[bytes, dict[str, Any], str] | BaseException) -> None:
        """`flight` has ended: hand its outcome to whoever waits for it."""
        if self._inflight.get(flight.key) is flight:
            del self._inflight[flight.key]
        for w in flight.waiters:
            w.outcome = outcome
            w.event.set()

    # -- the network part -------------------------------------------------------------------------------------

    async def exchange(self, ep: Endpoint, path: str, data: bytes, budget: Budget, tokens: float, model: str, *,
                       fixed_out: float = -1.0, stage: str = "", priority: int = 0, flight: _Flight | None = None
                       ) -> tuple[bytes, dict[str, Any], str]:
        """Send until answered: (raw body, parsed body, request id), or RequestFailed / RunStopped / NotSent.

        With the `flight` of a cache key (marked in flight by `call`), the answer is cached under its key, and the
        outcome is handed to the callers waiting for it.
        """
        try:
            cfg = self.config
            chat = path == CHAT
            counts = self.stats.view(stage, model)
            assert ep.transport is not None
            url = ep.urls[path]
            attempt = 0
            streak = -1  # the run of transient failures this request last counted itself in
            while True:
                if self.stopped is not None:
                    raise RunStopped(self.stopped)
                attempt += 1
                if self._halted:
                    raise NotSent()
                try:
                    ticket = budget.pay_now(tokens, priority)  # most payments need no wait: no wait is set up
                    if ticket is WAIT:
                        ticket = await self._unless_halted(budget.acquire, tokens, priority)
                except BudgetTooSmall as exc:
                    raise RequestFailed.make("exceeds_budget", str(exc), None, attempt - 1) from None
                if not self.slots.take() and await self._unless_halted(self.slots.acquire, priority):
                    budget.restamp(ticket)  # it waited for a slot after paying: the provider counts it from now
                if flight is not None:
                    if flight.scope is not None and flight.scope.cancel_called:
                        # Every caller left before it went out (their cancellation reaches this task only at its
                        # next wait, after the write): it is not sent.
                        self.slots.release()
                        raise NotSent()
                    flight.wired = True
                status, headers, raw, verdict, elapsed = await self._on_the_wire(ep, url, data, counts)
                if status:
                    budget.answered(ticket, elapsed)
                if status == 200:
                    try:
                        parsed = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        verdict = invalid_body_verdict(200, "truncated or non-JSON body")
                    else:
                        if usable(parsed, chat):
                            self._account(parsed, budget, ticket, tokens, fixed_out, model, counts, chat, elapsed)
                            if budget.silent < 64:  # a provider without rate-limit headers: stop looking
                                budget.sync_headers(headers)
                            self._failing_since = None
                            self._answered = True
                            raw, rid = _one_line(raw, parsed), headers.get("x-request-id", "")
                            break
                        verdict = invalid_body_verdict(200, "answer without " + ("choices" if chat else "data"))
                elif status:
                    if status == 429:
                        counts.rate_limited += 1
                    budget.sync_headers(headers)
                    verdict = classify_status(status, raw, headers)
                assert verdict is not None
                if verdict.kind == STOP:
                    raise self._stop(verdict.code, verdict.status, verdict.message)
                if verdict.kind == RETRY:
                    self._note_failing(verdict)
                    if streak != self._streak:
                        streak = self._streak
                        self._streak_requests += 1
                else:
                    self._failing_since = None  # a 4xx or a 429 is an answer: the provider is there
                    self._answered = True
                if verdict.kind == FAIL:
                    raise RequestFailed.make(verdict.code, self.scrub(verdict.message), verdict.status, attempt)
                if attempt >= cfg.max_attempts:
                    if verdict.kind == RETRY and self._failing_since is not None and (
                            not self._answered or self._streak_requests > 1):
                        # Nothing but transient failures, for more than this one request (or since the start):
                        # the provider is down, not this request's problem. Stop instead of failing every line.
                        raise self._stop("unreachable" if verdict.code == "connection_error" else "failing",
                                         verdict.status, verdict.message)
                    raise RequestFailed.make(verdict.code, self.scrub(f"{verdict.message} (after {attempt} attempts)"),
                                             verdict.status, attempt, retryable=True)
                counts.retries += 1
                hint = min(verdict.wait, cfg.backoff_cap) if verdict.wait is not None else None
                if verdict.kind == COOLDOWN:
                    if budget.requests or budget.tokens:
                        budget.widen_margins()
                    if hint is not None:
                        budget.cooldown(hint)  # the provider said when: every request of this budget waits
                        continue
                # Full jitter always; a server's Retry-After (capped) is a floor, never a reason to retry at once.
                wait = backoff(attempt, cfg.backoff_base, cfg.backoff_cap)
                await self._unless_halted(anyio.sleep, wait if hint is None else max(wait, hint))
        except BaseException as exc:
            if flight is not None:
                # A cancelled sender has no answer. The engine's (cut, the engine closing): NotSent, as after halt.
                # A generate worker's (its run stopped): whoever shares the request sends it themselves.
                stopped = NotSent() if flight.scope is not None or self._halted else _Again()
                self._share(flight, exc if isinstance(exc, Exception) else stopped)
            raise
        if flight is not None:
            if self.cache is not None:
                self.cache.put(flight.key, raw, rid)
            self._share(flight, (raw, parsed, rid))
        return raw, parsed, rid

    async def _on_the_wire(self, ep: Endpoint, url: str, data: bytes, counts: Counters
                           ) -> tuple[int, Any, bytes, Verdict | None, float]:
        """One attempt, holding a slot already taken: (status, headers, body, verdict of a failure below HTTP,
        seconds on the wire)."""
        transport = ep.transport
        assert transport is not None
        counts.sent += 1
        self.stats.in_flight += 1
        started = time.perf_counter()
        try:
            status, headers, raw = await transport.post(url, data)
            return status, headers, raw, None, time.perf_counter() - started
        except TRANSPORT_ERRORS as exc:
            if isinstance(exc, NOT_CONNECTED):
                counts.sent -= 1  # nothing reached the provider
            return 0, {}, b"", transport.verdict(exc), 0.0
        except BodyTooLarge as exc:
            raise RequestFailed.make("response_too_large", str(exc), 200, 1) from None
        finally:
            self.stats.in_flight -= 1
            self.slots.release()

    def usage(self, parsed: dict[str, Any], model: str) -> tuple[int, int, int, float, float]:
        """(prompt, completion, cached prompt tokens, cost, cost at full input price) of an answer's usage."""
        usage = parsed.get("usage")
        if type(usage) is not dict:
            return 0, 0, 0, 0.0, 0.0
        p = usage.get("prompt_tokens") or 0
        c = usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details")
        cached = (details.get("cached_tokens") or 0) if type(details) is dict else 0
        price = self.config.prices.get(model)
        if price is None:
            return p, c, cached, 0.0, 0.0
        cached_price = price.input if price.cached_input is None else price.cached_input
        full = (p * price.input + c * price.output) / 1e6
        return p, c, cached, full - cached * (price.input - cached_price) / 1e6, full

    def replayed(self, key: bytes, raw: bytes, model: str, stage: str, request_id: str,
                 parsed: dict[str, Any] | None = None) -> None:
        """Count what a chat answer replayed from the cache cost when it was paid for (at the batch price when
        the Batch API gave it). Answers a batch gave in this process were counted then; without prices only the
        batch count moves, so the body is parsed (from `raw`, unless `parsed` is given) only when it is priced."""
        by_batch = request_id.startswith(BATCH_ID)
        if key in self.paid_by_batch or not (self.config.prices or by_batch):
            return
        if self.config.prices:
            cost = self.usage(parsed if parsed is not None else orjson.loads(raw), model)[3]
        else:
            cost = 0.0
        if by_batch:
            cost *= self.batch_discount
        c = self.stats.view(stage, model)
        c.cost_replayed += cost
        c.batch_replayed += by_batch

    def _account(self, parsed: dict[str, Any], budget: Budget, ticket: Any, tokens: float, fixed_out: float,
                 model: str, counts: Counters, chat: bool, elapsed: float) -> None:
        p, c, cached, cost, full = self.usage(parsed, model)
        if chat:
            self.estimator.observe(model, c)
        if ticket:
            budget.settle(ticket, tokens, p + (c if fixed_out < 0 else fixed_out))
        counts.add_usage(p, c, cached, cost, full)
        counts.wire_s += elapsed

    def _note_failing(self, verdict: Verdict) -> None:
        """Only transient failures (no connection, 5xx, timeouts, broken bodies) for `unreachable_after` seconds:
        stop the run instead of spending every request's attempts on a provider that is down."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._streak += 1
            self._streak_requests = 0
        elif now - self._failing_since >= self.config.unreachable_after:
            raise self._stop("unreachable" if verdict.code == "connection_error" else "failing", verdict.status,
                             verdict.message)
