"""The `Engine`: cached, rate-limited, retried requests to OpenAI-compatible APIs (the engine's Python API).

    async with Engine(EngineConfig(base_url=..., cache_path="run/cache.db")) as engine:
        body = await engine.chat({"model": ..., "messages": [...]}, stage="judge")
        verdict = await engine.chat_json(body, Verdict, stage="judge")      # a typed Verdict
        vectors = await engine.embed(["text", ...], model="text-embedding-3-small")
        async for result in engine.generate(batch_requests): ...

Every request goes through one path (request.py): cache, sharing of identical requests in flight, the model's
budget, a connection slot held only on the wire, retries. What the Engine adds:

- `chat_json(body, T)` asks for `T`'s JSON schema and returns a `T`; an answer that does not match is asked
  again with the validation error as a follow-up message (its own cache key), a bounded number of times.
- `embed` caches each text on its own and packs the texts it must send with those of concurrent calls;
  models named in `local_models` (e.g. an in-process e5) answer in a worker thread, through the same cache.
- `stage=` and `priority=` on every call: per-stage counters in `stats`, and a later stage's requests go first
  when budget or slots are short.
- Cancelling a caller never makes the same key be paid twice, and an answer already on its way is cached.
- `halt()` sends nothing more (requests on the wire finish); `cut()` abandons the wire too.
- Leaving the `async with` block flushes the cache; an exception raised in the block comes out as itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
import numpy as np
import orjson

from tcia_async.config import EngineConfig, validate_engine
from tcia_async.engine.cache import ResponseCache
from tcia_async.engine.errors import EngineStats, NotSent, RequestFailed, RunStopped, primary
from tcia_async.engine.limits import Clock, REAL_CLOCK, Limiter
from tcia_async.engine.packing import Entry, Packer, PackResult
from tcia_async.engine.request import CHAT, EMBEDDINGS, Endpoint, Requests, canonical
from tcia_async.engine.runner import QueueSink, Run, Source
from tcia_async.engine.schema import response_format_for
from tcia_async.engine.tokens import byte_estimate, count_embedding_input
from tcia_async.records import BatchRequest, BatchResult

T = TypeVar("T")
LOCAL_BATCH = 32  # texts per call of an in-process embedding model


class LocalEmbedder(Protocol):
    """An embedding model that runs in this process. `identity` names it exactly (model and variant): it is the
    provider part of its cache keys. `embed` is blocking; the engine calls it in a worker thread."""

    identity: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


class StageEngine(Protocol):
    """What a pipeline stage needs from an engine (tests pass a recording fake)."""

    async def chat_json(self, body: dict[str, Any], typ: type[T], *, schema_name: str | None = None,
                        sample: int = 0, stage: str = "", priority: int = 0,
                        check: Callable[[T], str | None] | None = None) -> T: ...

    async def chat(self, body: dict[str, Any], sample: int = 0, *, stage: str = "", priority: int = 0
                   ) -> dict[str, Any]: ...

    async def embed(self, texts: Sequence[str], model: str, *, dimensions: int | None = None, stage: str = "",
                    priority: int = 0) -> np.ndarray: ...


def json_body(body: dict[str, Any], typ: type, schema_name: str | None = None) -> dict[str, Any]:
    """`body` asking for `typ`'s strict JSON schema: the first request `ask_json` sends (and the key its answer
    is cached under, which the Batch API mode fills)."""
    return {**body, "response_format": response_format_for(typ, schema_name or getattr(typ, "__name__", "answer"))}


async def ask_json(chat: Callable[..., Awaitable[dict[str, Any]]], attempts: int, body: dict[str, Any],
                   typ: type[T], *, schema_name: str | None = None, sample: int = 0, stage: str = "",
                   priority: int = 0, check: Callable[[T], str | None] | None = None) -> T:
    """The answer of `chat(body)` decoded as `typ` (a msgspec Struct), asked for with `typ`'s JSON schema (strict
    structured output).

    An answer that does not decode, or that `check` finds wrong (it returns what is wrong, or None), is asked
    again: the conversation goes on with the bad answer and the problem, so the model knows what to mend (a new
    body, so a cache key of its own: a rerun replays the same decisions). After `attempts` answers,
    RequestFailed with code "schema_mismatch".
    """
    body = json_body(body, typ, schema_name)
    attempts = max(1, attempts)
    why = ""
    for k in range(attempts):
        answer = await chat(body, sample, stage=stage, priority=priority)
        content = None
        try:
            message = answer["choices"][0]["message"]
            content = message.get("content")
            if not isinstance(content, str):
                raise ValueError(message.get("refusal") or "the answer has no text content")
            value = msgspec.json.decode(content, type=typ)
            problem = check(value) if check is not None else None
            if problem is None:
                return value
            why = problem[:400]
        except (msgspec.ValidationError, msgspec.DecodeError, KeyError, IndexError, TypeError,
                ValueError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"[:400]
        if k + 1 < attempts:
            body = {**body, "messages": [*body["messages"],
                                         {"role": "assistant", "content": content or ""},
                                         {"role": "user", "content": (
                                             f"That answer does not match the required JSON schema ({why}). "
                                             "Reply again with only a JSON object that matches it.")}]}
    name = body["response_format"]["json_schema"]["name"]
    raise RequestFailed.make("schema_mismatch", f"no answer matched {name} in {attempts} attempts (last: {why})",
                             200, attempts)


class Engine:
    """See the module docstring. One Engine per run; not shared between event loops."""

    def __init__(self, config: EngineConfig, *, local_models: Mapping[str, LocalEmbedder] | None = None,
                 clock: Clock = REAL_CLOCK, batch_discount: float = 0.5) -> None:
        self.config = validate_engine(config)  # a bad setting is a ConfigError naming it, not a slow failure
        self.batch_discount = batch_discount  # the [batch] discount: what a replayed batch answer cost
        self.stats = EngineStats()
        self.local_models = dict(local_models or {})
        self._limiter = Limiter(config.limits, config.model_limits, config.learn_limits_from_headers, clock)
        self._cache: ResponseCache | None = None
        self._requests: Requests | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._packers: dict[tuple[str, bytes], Packer] = {}
        self._local_eps = {name: Endpoint(None, "local:" + m.identity) for name, m in self.local_models.items()}
        self._local_gate = anyio.CapacityLimiter(1)  # one local model call at a time: they use every core
        self._embedding: dict[bytes, asyncio.Future] = {}  # texts being embedded now, by key

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        cfg = self.config
        if cfg.cache_path:
            # Answers received but not yet written are what a kill -9 makes us pay for again: batches of at most
            # a quarter of the concurrency (or 50 ms) keep that below one round of requests in flight.
            self._cache = ResponseCache(cfg.cache_path, batch_rows=max(8, min(512, cfg.concurrency // 4)))
        self._requests = Requests(cfg, self._cache, self.stats, self._limiter)
        self._requests.batch_discount = self.batch_discount
        try:
            await self._requests.open()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            await self._close()
            raise
        self._requests.spawn = self._tg.start_soon
        if self._cache is not None:
            self._tg.start_soon(self._cache.run_flusher)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                req = self._requests
                assert req is not None
                try:
                    if exc is None:
                        # Leaving normally: nothing more is sent, and the requests already on the wire (their
                        # callers went away) get up to `drain_timeout` to be answered and cached: they are paid for.
                        req.halt()
                        with anyio.move_on_after(self.config.drain_timeout):
                            await req.settle()
                finally:
                    req.cut()  # what is left (or, leaving on an error or a cancellation, all): not waited for
                    tg.cancel_scope.cancel()
                    try:
                        await tg.__aexit__(None, None, None)
                    except BaseExceptionGroup as group:
                        failure = primary(group)
                        if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
                            raise failure from None  # the engine's own task failed (the cache, most likely)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()
        return False  # an exception raised in the block propagates as itself

    async def _close(self) -> None:
        try:
            if self._requests is not None:
                await self._requests.close()
        finally:
            if self._cache is not None:
                cache, self._cache = self._cache, None
                cache.close()

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    @property
    def stopped(self) -> str | None:
        """Why the run was stopped (quota, auth, unreachable), or None."""
        return self._requests.stopped if self._requests is not None else None

    @property
    def requests(self) -> Requests:
        if self._tg is None or self._requests is None:
            raise RuntimeError("the engine is not open: use it inside `async with Engine(...) as engine:`")
        return self._requests

    def halt(self) -> None:
        """Send nothing more. Requests on the wire finish; those waiting for budget, a slot or a retry, and every
        later call, raise `NotSent` (no answer, nothing recorded: a rerun sends them)."""
        if self._requests is not None:
            self._requests.halt()

    def cut(self) -> None:
        """Halt, and abandon the requests on the wire (a second Ctrl-C): their answers are lost."""
        if self._requests is not None:
            self._requests.cut()

    def budget(self, model: str, url: str = CHAT) -> Any:
        """The rate budget (limits.Budget) of `model` at the endpoint that serves `url`."""
        return self._limiter.budget(self.requests.endpoint(url).provider, model)

    def key(self, body: dict[str, Any], url: str = CHAT, sample: int = 0) -> bytes:
        """The cache key of a request (see cache.py)."""
        return self.requests.endpoint(url).key(url, canonical(body), sample)

    # -- chat -----------------------------------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any], sample: int = 0, *, stage: str = "", priority: int = 0
                   ) -> dict[str, Any]:
        """The response body of a chat completion (from the cache when answered before with this `sample`)."""
        req = self.requests
        data = canonical(body)
        key = req.chat_ep.key(CHAT, data, sample)
        answer = await req.call(CHAT, body, data, key, stage=stage, priority=priority)
        parsed = answer.parsed()
        if answer.replayed:
            req.replayed(key, answer.raw, str(body.get("model") or ""), stage, answer.request_id, parsed)
        return parsed

    async def chat_json(self, body: dict[str, Any], typ: type[T], *, schema_name: str | None = None,
                        sample: int = 0, stage: str = "", priority: int = 0,
                        check: Callable[[T], str | None] | None = None) -> T:
        """The answer of a chat completion decoded as `typ` (a msgspec Struct): see `ask_json`."""
        return await ask_json(self.chat, self.config.schema_attempts, body, typ, schema_name=schema_name,
                              sample=sample, stage=stage, priority=priority, check=check)

    # -- embeddings -----------------------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], model: str, *, dimensions: int | None = None, stage: str = "",
                    priority: int = 0) -> np.ndarray:
        """Embeddings of `texts` as a float32 array of shape (len(texts), d), in order (no texts: shape (0, 0)).

        Each text is its own cache entry; the texts not in the cache travel packed with those of concurrent
        calls of the same model (packing.py). A text already being embedded by another call is not sent twice.
        """
        req = self.requests
        local = model in self.local_models
        ep = self._local_eps[model] if local else req.embed_ep
        params: dict[str, Any] = {"model": model}
        if dimensions is not None:
            params["dimensions"] = dimensions
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not one string (it would embed each character)")
        keys: list[bytes] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"embed() takes strings: item {i} is {type(t).__name__}")
            keys.append(ep.key(EMBEDDINGS, canonical({**params, "input": t})))
        counts = self.stats.view(stage, model)
        found: dict[bytes, Any] = {}
        if self._cache is not None and keys:
            for k, (raw, _) in self._cache.get_many(keys).items():
                found[k] = orjson.loads(raw)["data"][0]["embedding"]
        counts.cached += len(found)
        futures: dict[bytes, asyncio.Future] = {}
        for k, t in zip(keys, texts):
            if k in found or k in futures:
                continue
            futures[k] = self._entry(ep, model, params, local, [t], k, stage, priority)
        if futures:
            await asyncio.wait(list(futures.values()))  # cancelling this leaves the packed calls going
            for k, fut in futures.items():
                exc = fut.exception()
                if exc is not None:
                    if isinstance(exc, RequestFailed):
                        counts.failed += 1
                    raise exc
                found[k] = fut.result().data[0]["embedding"]
        counts.ok += len(keys)
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray([found[k] for k in keys], dtype=np.float32)

    def _packer(self, ep: Endpoint, model: str, params: dict[str, Any], local: bool) -> Packer:
        pkey = (ep.provider, canonical(params))
        packer = self._packers.get(pkey)
        if packer is not None:
            return packer
        req = self.requests
        cache = self._cache
        assert self._tg is not None

        if local:
            embedder = self.local_models[model]

            async def send(inputs: list[Any], tokens: int, stage: str, priority: int) -> dict[str, Any]:
                async with self._local_gate:
                    if req.halted:
                        raise NotSent()  # a batch that has not started yet is not run after halt()
                    vectors = await anyio.to_thread.run_sync(embedder.embed, list(inputs))
                self.stats.view(stage, model).sent += 1
                return {"object": "list", "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0},
                        "data": [{"object": "embedding", "index": i, "embedding": vec.tolist()}
                                 for i, vec in enumerate(np.asarray(vectors, dtype=np.float32))]}
        else:
            async def send(inputs: list[Any], tokens: int, stage: str, priority: int) -> dict[str, Any]:
                budget = req.limiter.budget(ep.provider, model)
                _, parsed, _ = await req.owned(req.exchange, ep, EMBEDDINGS, canonical({**params, "input": inputs}),
                                               budget, float(tokens) if budget.counts_tokens else 0.0, model,
                                               stage=stage, priority=priority)
                return parsed

        def on_answer(entry: Entry, result: PackResult) -> None:
            if cache is not None and entry.key is not None:
                cache.put(entry.key, orjson.dumps(result.body()))

        # An in-process model's memory grows with the texts it embeds at once (attention over every text):
        # a few dozen at a time keep it small, at the same speed.
        size = min(self.config.embedding_batch_size, LOCAL_BATCH) if local else self.config.embedding_batch_size
        packer = self._packers[pkey] = Packer(model, send, self._tg.start_soon, on_answer, size,
                                              self.config.embedding_batch_tokens)
        return packer

    def _entry(self, ep: Endpoint, model: str, params: dict[str, Any], local: bool, inputs: list[Any], key: bytes,
               stage: str, priority: int) -> asyncio.Future:
        """The packed entry embedding `inputs` under `key`: the one already in flight for that key if any."""
        fut = self._embedding.get(key)
        if fut is None:
            tokens = sum(byte_estimate(str(t)) for t in inputs) if local else count_embedding_input(inputs)
            fut = self._packer(ep, model, params, local).submit(inputs, tokens, key, stage, priority)
            self._embedding[key] = fut
            fut.add_done_callback(lambda _f: self._embedding.pop(key, None))
        return fut

    def embedding_entry(self, body: dict[str, Any], key: bytes, stage: str = "", priority: int = 0
                        ) -> asyncio.Future:
        """A Batch-format embeddings body as one packed entry cached under `key` (generate's lines). An entry
        answered since the caller looked in the cache, or in flight for an identical line, is not sent again."""
        model = str(body.get("model") or "")
        hit = self._cache.get(key) if self._cache is not None else None
        if hit is not None:
            done = asyncio.get_running_loop().create_future()
            answer = orjson.loads(hit[0])
            done.set_result(PackResult(answer["data"], 0, answer.get("model") or model))
            return done
        inp = body.get("input")
        inputs = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        params = {k: v for k, v in body.items() if k != "input"}
        local = model in self.local_models
        ep = self._local_eps[model] if local else self.requests.embed_ep
        return self._entry(ep, model, params, local, inputs, key, stage, priority)

    # -- bulk -----------------------------------------------------------------------------------------------------

    async def generate(self, requests: Iterable[BatchRequest] | AsyncIterable[BatchRequest], *,
                       stage: str = "generate") -> AsyncIterator[BatchResult]:
        """Results of Batch-format requests in completion order, one per request.

        `requests` may be a list, an iterator or an async iterator; an async one's requests are sent as they come.
        If it raises, the requests it made before are sent and their results come out, then its exception is
        raised as itself.

        A request that cannot be sent gets an error result: an unsupported url, or a custom_id an earlier request
        used (`duplicate_custom_id`: that result carries the repeated id, so key results by id only after
        dropping those). Raises RunStopped after yielding what completed when the provider stops the run. To stop
        early, close the generator (`contextlib.aclosing`): nothing more is sent, and the requests on the wire
        are cached as they are answered (up to `drain_timeout`); cancelling the consumer abandons them instead.
        """
        req = self.requests
        assert self._tg is not None
        sink = QueueSink(limit=max(64, 2 * self.config.concurrency))
        run = Run(req, self.embedding_entry, Source(req, requests, sink, stage=stage), sink, stage=stage)
        done = anyio.Event()

        async def drive() -> None:
            try:
                await run.run()
            except Exception as exc:  # handed to the consumer below
                sink.error = exc
            finally:
                sink.finish()
                done.set()

        self._tg.start_soon(drive)
        try:
            while True:
                item = await sink.get()
                if item is None:
                    break
                yield item
            if sink.error is not None:
                raise sink.error
            if run.stopped is not None:
                raise RunStopped(run.stopped)
        finally:
            if not done.is_set():
                # Closed early: no new requests; those on the wire get up to `drain_timeout` to be answered and
                # cached (they are paid for; their results have no reader). Cancelled: abandon them at once.
                sink.finish()
                run.drain()
                try:
                    with anyio.move_on_after(self.config.drain_timeout):
                        await done.wait()
                finally:
                    if not done.is_set():
                        run.abandon()
                        with anyio.CancelScope(shield=True):
                            await done.wait()


__all__ = ["Engine", "EngineStats", "LocalEmbedder", "NotSent", "RequestFailed", "RunStopped", "StageEngine",
           "CHAT", "EMBEDDINGS"]
