"""The `Engine`: cached, rate-limited, retried requests to OpenAI-compatible APIs (the engine's Python API).

    async with Engine(EngineConfig(base_url=..., cache_path="run/cache.db")) as engine:
        body = await engine.chat({"model": ..., "messages": [...]}, sample=0)
        obj = await engine.chat_json(body_with_response_format, SomeStruct)
        vecs = await engine.embed(["text", ...], model="text-embedding-3-small")
        async for res in engine.generate(batch_requests): ...

Guarantees:
- A request whose key (cache.py) has an answer in the cache is answered from it without a network call; identical
  requests in flight at the same moment share one call.
- Every network attempt first pays its (provider, model) budget (limits.py); failures follow retry.py.
- `RequestFailed` is one request's recorded failure; `RunStopped` means quota/auth: after the first one, every
  call raises `RunStopped` without sending.
- The API key is only ever sent in the Authorization header; it is scrubbed from every error message.
- Leaving the `async with` block stops the engine's own tasks and flushes the cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import anyio
import msgspec
import orjson

from tcia_async.config import EngineConfig
from tcia_async.engine.cache import ResponseCache, key_prefix, request_key
from tcia_async.engine.client import TRANSPORT_ERRORS, Transport
from tcia_async.engine.errors import EngineStats, NotSent, RequestFailed, RunStopped
from tcia_async.engine.limits import WAIT, Budget, BudgetTooSmall, Limiter
from tcia_async.engine.packing import Packer, PackResult
from tcia_async.engine.retry import COOLDOWN, FAIL, STOP, backoff, classify_status, invalid_body_verdict
from tcia_async.engine.tokens import (OutputEstimator, chat_prompt_bound_from_json, count_chat_prompt,
                                      count_embedding_input)
from tcia_async.records import BatchRequest, BatchResult, ErrorOut

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
SUPPORTED_URLS = (CHAT, EMBEDDINGS)

_loads = orjson.loads
_dumps = orjson.dumps
_SORT = orjson.OPT_SORT_KEYS
_JSONError = orjson.JSONDecodeError


class _Endpoint:
    """One base URL: its transport and the key prefix of each URL path."""

    __slots__ = ("transport", "provider", "prefixes", "urls")

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.provider = transport.provider
        self.prefixes = {p: key_prefix(self.provider, p) for p in SUPPORTED_URLS}
        self.urls = {p: transport.url(p) for p in SUPPORTED_URLS}


class _Abandoned(Exception):
    """The request another caller was waiting on was cancelled; the waiter sends it itself."""


def _compact(raw: bytes, parsed: Any) -> bytes:
    # Providers may pretty-print; results are JSONL and the cache stores what a result line embeds.
    return _dumps(parsed) if b"\n" in raw else raw


class Engine:
    """See the module docstring. One Engine per run; not shared between event loops."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stats = EngineStats()
        self._stopped: str | None = None
        self._inflight: dict[bytes, list[asyncio.Future] | None] = {}
        self._estimator = OutputEstimator()
        self._limiter = Limiter(config.limits, config.model_limits, config.learn_limits_from_headers)
        self._packers: dict[tuple[int, bytes], Packer] = {}
        self._cache: ResponseCache | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._secrets: list[str] = []
        self._prices = config.prices
        self._halted = False
        self._unreachable_since: float | None = None  # first connection error since the last answer
        self._holding: set[anyio.CancelScope] = set()  # waits before a send, cancelled by halt()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        cfg = self.config
        key = cfg.api_key()
        ekey = cfg.api_key(embeddings=True)
        self._secrets = [s for s in (key, ekey) if s]
        chat_t = Transport(cfg.base_url, key, cfg.concurrency, cfg.timeout)
        ebase = cfg.embedding_base_url or cfg.base_url
        if ebase == cfg.base_url and ekey == key:
            embed_t = chat_t
        else:
            embed_t = Transport(ebase, ekey, cfg.concurrency, cfg.timeout)
        self._chat_ep = _Endpoint(chat_t)
        self._embed_ep = self._chat_ep if embed_t is chat_t else _Endpoint(embed_t)
        self._slots = asyncio.Semaphore(max(1, cfg.concurrency))
        if cfg.cache_path:
            # Its writes go to a process of its own (cache.py, "The writer process"): off this loop's CPU. Answers
            # received but not yet handed to it are what a kill -9 makes us pay for again: keep them under a
            # quarter of the concurrency (and 50 ms), so a resumed run repeats fewer calls than one round in flight.
            self._cache = ResponseCache(cfg.cache_path, batch_rows=max(8, min(512, cfg.concurrency // 4)),
                                        writer="process")
        await chat_t.open()
        if embed_t is not chat_t:
            await embed_t.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self._cache is not None:
            self._tg.start_soon(self._cache.run_flusher)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(*exc_info)
        finally:
            with anyio.CancelScope(shield=True):
                await self._chat_ep.transport.close()
                if self._embed_ep is not self._chat_ep:
                    await self._embed_ep.transport.close()
                if self._cache is not None:
                    self._cache.close()
        return None

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    @property
    def stopped(self) -> str | None:
        """Why the run was stopped (quota/auth), or None."""
        return self._stopped

    def halt(self) -> None:
        """Send nothing more. Requests on the wire finish; those waiting for budget or for a retry, and every
        later call, raise `NotSent` (no answer, nothing recorded: a rerun sends them)."""
        self._halted = True
        for scope in list(self._holding):
            scope.cancel()

    async def _held(self, make_wait: Any, *args: Any) -> Any:
        """Await `make_wait(*args)` unless `halt()` comes first (then NotSent)."""
        if self._halted:
            raise NotSent()
        with anyio.CancelScope() as scope:
            self._holding.add(scope)
            try:
                return await make_wait(*args)
            finally:
                self._holding.discard(scope)
        raise NotSent()  # reached only when halt() cancelled the wait

    def key(self, body: dict[str, Any], url: str = CHAT, sample: int = 0) -> bytes:
        """The cache key of a request (see cache.py)."""
        ep = self._embed_ep if url == EMBEDDINGS else self._chat_ep
        return request_key(ep.prefixes[url], sample, _dumps(body, option=_SORT))

    # -- the attempt loop -----------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    def _reservation(self, budget: Budget, body: dict[str, Any], size: int, model: str) -> tuple[float, float]:
        """(tokens to reserve, output tokens charged whatever the answer; -1 when the real completion counts) of a
        chat body whose JSON is `size` bytes long. (Packed embeddings reserve their counted input: `_packer`.)

        Providers charge `max_tokens` against TPM when the request is admitted (OpenAI: "the maximum of max_tokens
        and the estimated number of tokens", platform.openai.com/docs/guides/rate-limits), so with `max_tokens`
        the reservation is prompt + max_tokens and stays; without it the learned output estimate is reserved and
        settled with the real completion.
        """
        n = body.get("n") or 1
        if type(n) is not int or n < 1:
            n = 1
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        if type(cap) is not int or cap <= 0:
            cap = 0
        # Far from the limit the exact prompt count changes no decision: reserve a tokenizer-free upper bound
        # (settlement puts the provider's real count in its place): one from the JSON's length, no walk of the body.
        # Near the limit, count exactly.
        prompt = chat_prompt_bound_from_json(size)
        headroom = budget.token_headroom()  # nothing changes the windows until the payment: computed once
        if prompt * 2 + cap * n > headroom:
            prompt = count_chat_prompt(body)
        if cap:
            return float(prompt + cap * n), float(cap * n)
        guess = self._estimator.estimate(model, None) * n
        if budget.tokens and prompt + guess > headroom:
            # A guess of the answer's length must not make a request "larger than the whole budget": only the
            # prompt and an explicit max_tokens can. Settlement charges the real completion afterwards.
            whole = min(w.limit for w in budget.tokens)
            guess = min(guess, max(0.0, whole - prompt))
        return float(prompt + guess), -1.0

    def _plan(self, ep: _Endpoint, body: dict[str, Any], size: int) -> tuple[Budget, float, float, str]:
        """(budget, tokens to reserve, fixed output charge, model) of a chat body whose JSON is `size` bytes."""
        model = body.get("model") or ""
        budget = self._limiter.budget(ep.provider, model)
        if budget.counts_tokens:
            tokens, fixed = self._reservation(budget, body, size, model)
            return budget, tokens, fixed, model
        return budget, 0.0, -1.0, model

    async def _exchange(self, ep: _Endpoint, url: str, data: bytes, budget: Budget, tokens: float, model: str,
                        chat: bool, fixed_out: float = -1.0, key: bytes | None = None
                        ) -> tuple[bytes, dict[str, Any], str, int]:
        """Send until answered: (raw body, parsed body, request id, attempts) or RequestFailed / RunStopped.

        With a cache `key` (chat; its caller saw it was not in flight): the key is in flight until this ends, the
        answer is stored (`_answered`) and whoever waits for the key gets the answer or the failure
        (`_abandoned`). This is one coroutine, under the caller's, for the whole request: each layer between the
        caller and the HTTP exchange costs a frame at every resumption.
        """
        cfg = self.config
        stats = self.stats
        transport = ep.transport
        request = transport.request
        attempt = 0
        if key is not None:
            self._inflight[key] = None  # a list of waiting futures once someone waits
        try:
            while True:
                if self._stopped is not None:
                    raise RunStopped(self._stopped)
                if self._halted:
                    raise NotSent()
                attempt += 1
                try:
                    ticket = budget.pay_now(tokens)
                    if ticket is WAIT:
                        ticket = await self._held(budget.acquire, tokens)
                except BudgetTooSmall as exc:
                    raise RequestFailed.make("exceeds_budget", str(exc), None, attempt - 1) from None
                stats.sent += 1
                try:
                    async with request(url, data) as resp:
                        raw = await resp.read()
                        status = resp.status
                        headers = resp.headers
                except TRANSPORT_ERRORS as exc:
                    status, raw, headers = 0, b"", transport.verdict(exc)
                if status == 200:
                    try:
                        parsed = _loads(raw)
                    except _JSONError:
                        verdict = invalid_body_verdict(200, "truncated or non-JSON body")
                    else:
                        if type(parsed) is dict and (("choices" in parsed) if chat else ("data" in parsed)):
                            if budget.silent < 64:
                                budget.sync_headers(headers)
                            usage = parsed.get("usage")
                            if usage:
                                p = usage.get("prompt_tokens") or 0
                                c = usage.get("completion_tokens") or 0
                                stats.prompt_tokens += p
                                stats.completion_tokens += c
                                stats.tokens += p + c
                                if chat:
                                    self._estimator.observe(model, c)
                                if ticket:
                                    budget.settle(ticket, tokens, p + (c if fixed_out < 0 else fixed_out))
                                if self._prices:
                                    price = self._prices.get(model)
                                    if price is not None:
                                        stats.cost += (p * price.input + c * price.output) / 1e6
                            self._unreachable_since = None
                            rid = headers.get("x-request-id", "")
                            if key is not None:
                                raw = self._answered(key, raw, parsed, rid)
                            return raw, parsed, rid, attempt
                        verdict = invalid_body_verdict(200, "answer without " + ("choices" if chat else "data"))
                elif status:
                    self._unreachable_since = None  # it answered: reachable, whatever it said
                    if status == 429:
                        stats.rate_limited += 1
                    budget.sync_headers(headers)
                    verdict = classify_status(status, raw, headers)
                else:
                    verdict = headers
                    if verdict.code == "connection_error":
                        # Nothing but refused or broken connections for a while (a wrong base URL, the provider down):
                        # stop the run rather than spend every request's attempts on it. A rerun continues.
                        now = anyio.current_time()
                        if self._unreachable_since is None:
                            self._unreachable_since = now
                        elif now - self._unreachable_since >= cfg.unreachable_after:
                            self._stop("unreachable", None, verdict.message)
                            raise RunStopped(self._stopped or "")
                kind = verdict.kind
                if kind == STOP:
                    self._stop(verdict.code, verdict.status, verdict.message)
                    raise RunStopped(self._stopped or "")
                if kind == FAIL:
                    raise RequestFailed.make(verdict.code, self._scrub(verdict.message), verdict.status, attempt)
                if attempt >= cfg.max_attempts:
                    raise RequestFailed.make(verdict.code, self._scrub(f"{verdict.message} (after {attempt} attempts)"),
                                             verdict.status, attempt, retryable=True)
                stats.retries += 1
                hint = min(verdict.wait, cfg.backoff_cap) if verdict.wait is not None else None
                if kind == COOLDOWN:
                    if budget.requests or budget.tokens:
                        budget.widen_margins()
                    if hint is not None:
                        # The provider said when: every request of this budget waits, not just this one.
                        budget.cooldown(hint)
                        continue
                # Full jitter always; a server's Retry-After (capped) is a floor, never a reason to retry at once.
                wait = backoff(attempt, cfg.backoff_base, cfg.backoff_cap)
                await self._held(anyio.sleep, wait if hint is None else max(wait, hint))
        except BaseException as exc:
            if key is not None:
                self._abandoned(key, exc)
            raise

    def _answered(self, key: bytes, raw: bytes, parsed: Any, rid: str) -> bytes:
        """Store the answer to `key` and hand it to the callers waiting for it; returns the stored bytes."""
        raw = _compact(raw, parsed)
        if self._cache is not None:
            self._cache.put(key, raw, rid)
        waiters = self._inflight.pop(key, None)
        if waiters:
            for f in waiters:
                if not f.done():
                    f.set_result(raw)
        return raw

    def _abandoned(self, key: bytes, exc: BaseException) -> None:
        """`key` is no longer in flight: its waiters get the failure, or send it themselves (cancelled)."""
        waiters = self._inflight.pop(key, None)
        if waiters:
            err = exc if isinstance(exc, (RequestFailed, RunStopped)) else _Abandoned()
            for f in waiters:
                if not f.done():
                    f.set_exception(err)

    def _stop(self, code: str, status: int | None, message: str) -> None:
        if self._stopped is not None:
            return
        why = {
            "insufficient_quota": "the provider says the quota is used up (429 insufficient_quota)",
            "unauthorized": "the provider rejected the API key (401)",
            "forbidden": "the provider refused access (403)",
            "unreachable": f"no connection to the provider for {self.config.unreachable_after:g} s",
        }.get(code, f"the provider refused the run ({status} {code})")
        self._stopped = self._scrub(f"{why}: {message}".strip())

    # -- one request, with cache and in-flight sharing ----------------------------------------------------------

    async def _cached_call(self, ep: _Endpoint, path: str, key: bytes, data: bytes, body: dict[str, Any],
                           check_cache: bool = True) -> tuple[bytes, dict[str, Any] | None, str, bool]:
        """(raw, parsed or None, request id, shared) of one chat request, through the cache and the network.

        `shared` is True when the answer came from the cache or from an identical request in flight.
        """
        cache = self._cache
        inflight = self._inflight
        while True:
            if cache is not None and check_cache:
                hit = cache.get(key)
                if hit is not None:
                    return hit[0], None, hit[1], True
            if key not in inflight:
                break
            # An identical request is in flight: wait for its answer instead of paying twice.
            waiters = inflight[key]
            if waiters is None:
                waiters = inflight[key] = []
            fut = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            try:
                raw = await fut
            except _Abandoned:
                check_cache = True
                continue
            return raw, None, "", True
        # Nothing awaits between the check above and `_exchange` marking the key in flight.
        budget, tokens, fixed, model = self._plan(ep, body, len(data))
        raw, parsed, rid, _ = await self._exchange(ep, ep.urls[path], data, budget, tokens, model, True, fixed, key)
        return raw, parsed, rid, False

    # -- public API -----------------------------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any], sample: int = 0) -> dict[str, Any]:
        """The response body of a chat completion (from the cache when answered before with this `sample`)."""
        ep = self._chat_ep
        data = _dumps(body, option=_SORT)
        key = request_key(ep.prefixes[CHAT], sample, data)
        try:
            # The slot is held while waiting for an identical request in flight too (rare; it cannot deadlock:
            # the one in flight holds a slot of its own).
            async with self._slots:
                raw, parsed, _, cached = await self._cached_call(ep, CHAT, key, data, body)
        except RequestFailed:
            self.stats.failed += 1
            raise
        self.stats.ok += 1
        if cached:
            self.stats.cached += 1
        return parsed if parsed is not None else _loads(raw)

    async def chat_json(self, body: dict[str, Any], typ: type, sample: int = 0) -> Any:
        """The message content of a chat completion decoded as `typ` (a msgspec Struct or type).

        An answer that does not decode is asked again with sample indexes `sample + 1000*k`, k = 1 ..
        schema_attempts-1 (deterministic keys, so a rerun replays the same decisions); then RequestFailed with
        code "schema_mismatch".
        """
        n = max(1, self.config.schema_attempts)
        why = ""
        for k in range(n):
            answer = await self.chat(body, sample=sample + 1000 * k)
            try:
                content = answer["choices"][0]["message"]["content"]
                return msgspec.json.decode(content, type=typ)
            except (msgspec.ValidationError, msgspec.DecodeError, KeyError, IndexError, TypeError) as exc:
                why = f"{type(exc).__name__}: {exc}"
        name = getattr(typ, "__name__", str(typ))
        raise RequestFailed.make("schema_mismatch", f"the answer did not match {name} in {n} attempts ({why})"[:500],
                                 200, n)

    async def embed(self, texts: Sequence[str], model: str, *, dimensions: int | None = None) -> Any:
        """Embeddings of `texts` as a float32 numpy array of shape (len(texts), d), in order.

        Each text is its own cache entry; texts not in the cache from this and concurrent calls of the same model
        travel packed (packing.py).
        """
        import numpy as np

        ep = self._embed_ep
        params: dict[str, Any] = {"model": model}
        if dimensions is not None:
            params["dimensions"] = dimensions
        prefix = ep.prefixes[EMBEDDINGS]
        keys: list[bytes] = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError("embed() takes strings")
            body = dict(params)
            body["input"] = t
            keys.append(request_key(prefix, 0, _dumps(body, option=_SORT)))
        cache = self._cache
        found: dict[bytes, Any] = {}
        if cache is not None and keys:
            for k, (raw, _) in cache.get_many(keys).items():
                found[k] = _loads(raw)["data"][0]["embedding"]
        self.stats.cached += sum(1 for k in keys if k in found)
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k not in found and k not in missing:
                missing[k] = t
        if missing:
            packer = self._packer(ep, params)
            futs = {k: packer.submit([t], count_embedding_input(model, t)) for k, t in missing.items()}
            try:
                await asyncio.wait(list(futs.values()))
            finally:
                for f in futs.values():
                    if not f.done():
                        f.cancel()
            failure: BaseException | None = None
            for k, f in futs.items():
                exc = f.exception()
                if exc is not None:
                    if failure is None:
                        failure = exc
                    continue
                res: PackResult = f.result()
                found[k] = res.data[0]["embedding"]
                if cache is not None:
                    cache.put(k, _dumps(res.body()))  # paid for: kept even when another text failed
            if failure is not None:
                if isinstance(failure, RequestFailed):
                    self.stats.failed += 1
                raise failure
        self.stats.ok += len(keys)
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray([found[k] for k in keys], dtype=np.float32)

    def _packer(self, ep: _Endpoint, params: dict[str, Any]) -> Packer:
        pkey = (id(ep), _dumps(params, option=_SORT))
        p = self._packers.get(pkey)
        if p is None:
            model = str(params.get("model") or "")
            url = ep.urls[EMBEDDINGS]

            async def send(data: bytes, tokens: int) -> dict[str, Any]:
                budget = self._limiter.budget(ep.provider, model)
                async with self._slots:
                    _, parsed, _, _ = await self._exchange(ep, url, data, budget,
                                                           float(tokens) if budget.counts_tokens else 0.0,
                                                           model, False)
                return parsed

            assert self._tg is not None, "use `async with Engine(...)`"
            p = self._packers[pkey] = Packer(params, send, self._tg.start_soon, self.config.embedding_batch_size,
                                             self.config.embedding_batch_tokens)
        return p

    async def generate(self, requests: Iterable[BatchRequest] | AsyncIterable[BatchRequest]
                       ) -> AsyncIterator[BatchResult]:
        """Results of Batch-format requests in completion order, every custom_id exactly once.

        A request that cannot be sent (unsupported url, duplicate custom_id) gets an error result. Raises
        RunStopped after yielding what completed when the provider stops the run.

        To stop early, close the generator (`async with contextlib.aclosing(engine.generate(...)) as results:`):
        the run is abandoned when it closes. A generator left open after a `break` keeps sending until its
        result queue is full.
        """
        from tcia_async.engine.runner import QueueSink, RequestSource, Run

        assert self._tg is not None, "use `async with Engine(...)`"
        sink = QueueSink(limit=max(64, 2 * self.config.concurrency))
        run = Run(self, RequestSource(self, requests, sink), sink)
        done = anyio.Event()

        async def drive() -> None:
            try:
                await run.run()
            except BaseException as exc:  # handed to the consumer below
                sink.error = exc
                if not isinstance(exc, Exception):
                    raise
            finally:
                sink.finished = True
                sink.wake()
                done.set()

        self._tg.start_soon(drive)
        try:
            while True:
                while sink.items:
                    yield sink.pop()
                if sink.finished and not sink.items:
                    break
                await sink.wait()
            if sink.error is not None:
                raise sink.error
            if run.stopped is not None:
                raise RunStopped(run.stopped)
        finally:
            if not sink.finished:
                run.abandon()
                with anyio.CancelScope(shield=True):
                    await done.wait()

    # -- used by the runner ---------------------------------------------------------------------------------------

    async def _run_item(self, item: Any) -> tuple[bytes, dict[str, Any] | None, str, bool]:
        """Answer one prepared work item (runner.WorkItem): (raw, parsed or None, request id, from_cache)."""
        if item.path == CHAT:
            # The runner looked the key up in the cache already (in batches).
            return await self._cached_call(self._chat_ep, CHAT, item.key, item.data, item.body, False)
        ep = self._embed_ep
        body = item.body
        inp = body.get("input")
        inputs = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        params = {k: v for k, v in body.items() if k != "input"}
        model = str(body.get("model") or "")
        res: PackResult = await self._packer(ep, params).submit(inputs, count_embedding_input(model, inputs))
        answer = res.body()
        raw = _dumps(answer)
        if self._cache is not None:
            self._cache.put(item.key, raw)
        return raw, answer, "", False


__all__ = ["Engine", "EngineStats", "RequestFailed", "RunStopped", "ErrorOut", "CHAT", "EMBEDDINGS"]
