"""The simulator's HTTP server: one handler per endpoint on aiohttp's low-level server (no router, no
middleware, no access log), so a zero-latency answer costs about what a minimal aiohttp handler costs.

Order of checks for a chat or embeddings request, as a real provider applies them: auth (401), quota (429
insufficient_quota), request larger than the whole TPM (429 "Request too large"), rate limits (429), injected
fault, then the answer after the computed latency. Each model has its own limit windows, as providers count
them per model.
"""

from __future__ import annotations

import asyncio
from collections import deque
import base64
import hashlib
import logging
import math
import random
import socket
import threading
import time
from contextlib import AsyncExitStack
from email.utils import formatdate
from typing import Any

import anyio
import orjson
from aiohttp import web

from tcia_async.sim import faults, rules, tokens
from tcia_async.sim.batches import BatchStore
from tcia_async.sim.config import SimConfig
from tcia_async.sim.embeddings import embed
from tcia_async.sim.ledger import Ledger
from tcia_async.sim.limits import Limits, rate_headers, retry_headers
from tcia_async.sim.prompt_cache import MIN_TOKENS, PromptCache

log = logging.getLogger("tcia_async.sim")

MODELS = (
    "gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
    "text-embedding-3-small", "text-embedding-3-large",
)
_JSON = "application/json"
_SORT = orjson.OPT_SORT_KEYS
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_MASK64 = (1 << 64) - 1


class BadRequest(Exception):
    """A request the provider would refuse with 400 (or `status`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict:
        message = self.message if self.message.endswith("[simulated]") else self.message + " [simulated]"
        return {"error": {"message": message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


class Answer:
    """A computed answer: response body, content hash, tokens, and what the limits charge for it."""

    __slots__ = ("body", "charge", "completion", "key", "model", "prompt")

    def __init__(self, body: dict, key: bytes, prompt: int, completion: int, charge: int, model: str):
        self.body = body
        self.key = key
        self.prompt = prompt
        self.completion = completion
        self.charge = charge
        self.model = model


def _json_response(obj: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    h = {"Content-Type": _JSON}
    if headers:
        h.update(headers)
    return web.Response(body=orjson.dumps(obj, option=_NUMPY), status=status, headers=h)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}
_FAST_MAX = 64 * 1024  # larger bodies take aiohttp's writer, which honours flow control
_date_cache: list = [0, b""]


def _date_line() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_cache[1]


class RawResponse:
    """A complete HTTP/1.1 JSON response pre-serialised to bytes and written in one call.

    aiohttp's server accepts any object with `prepare(request)`, `write_eof()` and `keep_alive` (it duck-types
    the handler's return value); skipping StreamResponse's header machinery saves a good part of the
    per-request CPU. Only for small bodies (see _FAST_MAX); the tests exercise it on every request.
    """

    __slots__ = ("_data", "keep_alive", "status")

    def __init__(self, status: int, body: bytes, headers: dict[str, str], keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode(), _date_line(),
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)]
        for k, v in headers.items():
            parts.append(f"{k}: {v}\r\n".encode())
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self._data = b"".join(parts)

    async def prepare(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        transport.write(self._data)

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _respond(request: web.BaseRequest, status: int, body: bytes, headers: dict[str, str]):
    if len(body) <= _FAST_MAX:
        return RawResponse(status, body, headers, request.keep_alive)
    return web.Response(body=body, status=status, headers={"Content-Type": _JSON, **headers})


def _content_key(tag: bytes, body: dict) -> bytes:
    return hashlib.blake2b(tag + orjson.dumps(body, option=_SORT), digest_size=16).digest()


class Handlers:
    """All request handling state of one simulator: ledger, limits, faults, files and batches."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.ledger = Ledger()
        self._limited_any = bool(cfg.rpm or cfg.tpm or cfg.rps)
        self._limits: dict[str, Limits] = {}  # per model, as providers count them
        self.faults = faults.FaultPlan(cfg)
        self._seed_mix = (cfg.seed * 0x9E3779B97F4A7C15) & _MASK64
        self._jitter = random.Random(cfg.seed ^ 0x7177E5)
        self._ids = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        self.batches = BatchStore(self, cfg)
        self._style = cfg.headers
        self._auth = f"Bearer {cfg.api_key}" if cfg.api_key else None
        self.recent: deque = deque(maxlen=max(0, cfg.record_bodies))
        self.prompt_cache = PromptCache()
        self._routes = {
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/files"): self.batches.upload,
            ("GET", "/v1/files"): self.batches.list_files,
            ("POST", "/v1/batches"): self.batches.create,
            ("GET", "/v1/batches"): self.batches.list,
        }

    async def wait_requests(self, n: int) -> None:
        """Return once the ledger has counted at least `n` requests (woken by arrivals, no polling)."""
        while self.ledger.requests < n:
            ev = asyncio.Event()
            self._waiters.append((n, ev))
            await ev.wait()

    def _wake(self) -> None:
        count = self.ledger.requests
        still = []
        for n, ev in self._waiters:
            if count >= n:
                ev.set()
            else:
                still.append((n, ev))
        self._waiters = still

    def reset(self) -> None:
        """Clear the ledger, the rate-limit windows and the prompt cache (files and batches stay)."""
        self.ledger.reset()
        self._limits.clear()
        self.prompt_cache.clear()

    # ---------------------------------------------------------------------------------------------- dispatch
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/sim/"):
            return self._sim(request, path)
        self.ledger.requests += 1
        if self._waiters:
            self._wake()
        if request.headers.get("Expect") == "100-continue":  # curl sends it for larger bodies; no router here
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            if self._auth is not None and request.headers.get("Authorization") != self._auth:
                resp = _json_response(BadRequest("Incorrect API key provided. [simulated]", None, 401,
                                                 "invalid_api_key").body(), 401)
            else:
                fn = self._routes.get((request.method, path))
                resp = await (fn(request) if fn is not None else self._dynamic(request, path))
        except BadRequest as e:
            resp = _json_response(e.body(), e.status)
        except Exception as e:  # a simulator bug must still look like a provider's 500
            log.exception("simulator error on %s %s", request.method, path)
            resp = _json_response({"error": {"message": f"simulator error: {e!r}", "type": "server_error",
                                             "param": None, "code": None}}, 500)
        if resp is not None:
            self.ledger.by_status[resp.status] += 1
            return resp
        # The connection was reset or cut short on purpose: aiohttp has nothing left to send.
        raise asyncio.CancelledError

    async def _dynamic(self, request: web.BaseRequest, path: str):
        parts = path.strip("/").split("/")
        method = request.method
        if len(parts) >= 3 and parts[0] == "v1":
            kind, oid, rest = parts[1], parts[2], parts[3:]
            if kind == "files":
                if method == "GET" and not rest:
                    return self.batches.get_file(oid)
                if method == "GET" and rest == ["content"]:
                    return self.batches.file_content(oid)
                if method == "DELETE" and not rest:
                    return self.batches.delete_file(oid)
            elif kind == "batches":
                if method == "GET" and not rest:
                    return self.batches.get(oid)
                if method == "POST" and rest == ["cancel"]:
                    return self.batches.cancel(oid)
            elif kind == "models" and method == "GET" and not rest:
                return self.model(oid)
        raise BadRequest(f"Unknown request URL: {method} {path}. [simulated]", None, 404, "unknown_url")

    def _sim(self, request: web.BaseRequest, path: str) -> web.Response:
        if path == "/sim/stats" and request.method == "GET":
            return _json_response(self.ledger.snapshot())
        if path == "/sim/reset" and request.method == "POST":
            self.reset()
            return _json_response({"reset": True})
        return _json_response({"error": {"message": f"unknown simulator path {path}", "type": "invalid_request_error",
                                         "param": None, "code": None}}, 404)

    # ----------------------------------------------------------------------------------------------- answers
    def answer_chat(self, body: Any) -> Answer:
        """The deterministic answer to a chat completions body (raises BadRequest for an invalid one)."""
        if type(body) is not dict:
            raise BadRequest("The request body must be a JSON object. [simulated]")
        get = body.get
        model = get("model")
        messages = get("messages")
        if type(model) is not str or not model:
            raise BadRequest("you must provide a model parameter", "model")
        if type(messages) is not list or not messages:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        if get("stream"):
            raise BadRequest("The simulator does not stream; send stream=false. [simulated]", "stream")
        max_tokens = get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = get("max_tokens")
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            raise BadRequest("max_tokens must be a positive integer", "max_tokens")
        n = get("n") or 1
        if type(n) is not int or not 1 <= n <= 128:
            raise BadRequest("n must be an integer from 1 to 128", "n")
        key = _content_key(b"chat:", body)
        h = int.from_bytes(key[:8], "little") ^ self._seed_mix
        prompt = tokens.count_messages(messages)
        fmt = get("response_format")
        ftype = fmt.get("type") if type(fmt) is dict else None
        prefix = messages
        if ftype == "json_schema" and type(fmt.get("json_schema")) is dict:
            # A structured-output schema is part of the prompt (billed and cached as its first part, as OpenAI
            # does): counted here as a message before the others.
            schema = orjson.dumps(fmt["json_schema"].get("schema")).decode()
            prompt += tokens.count_once(schema)
            prefix = [{"role": "system", "content": schema}, *messages]
        # Short prompts (most benchmark requests) skip the cache's bookkeeping: nothing under 1,024 tokens is cached.
        cached = self.prompt_cache.cached_tokens(model, prefix, prompt) if prompt >= MIN_TOKENS else 0
        choices = []
        completion = 0
        for i in range(n):
            hi = (h + i) & _MASK64
            finish = "stop"
            if ftype is None or ftype == "text":
                length = rules.completion_length(max_tokens, hi, model)
                content = rules.text_of_length(length, hi)
                used = rules.text_tokens(length, content)
                if used == max_tokens:
                    finish = "length"
            elif ftype == "json_schema":
                js = fmt.get("json_schema")
                if type(js) is not dict or "schema" not in js:
                    raise BadRequest("response_format.json_schema.schema is required", "response_format")
                obj = rules.structured(js.get("name", ""), js["schema"], messages, hi, self.cfg.seed)
                content = orjson.dumps(obj).decode()
                used = tokens.count_once(content)
            elif ftype == "json_object":
                length = rules.completion_length(max_tokens, hi, model)
                content = orjson.dumps({"answer": rules.text_of_length(length, hi)}).decode()
                used = tokens.count_once(content)
            else:
                raise BadRequest(f"response_format type {ftype!r} is not supported", "response_format")
            completion += used
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            })
        resp = {
            "id": "chatcmpl-sim" + key[:12].hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "tcia-sim",
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": cached}},
        }
        charge = prompt + (max_tokens * n if max_tokens is not None else completion)
        return Answer(resp, key, prompt, completion, charge, model)

    def answer_embeddings(self, body: Any) -> Answer:
        """The deterministic answer to an embeddings body (raises BadRequest for an invalid one)."""
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object. [simulated]")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        if "input" not in body:
            raise BadRequest("'input' is a required property", "input")
        try:
            prompt, items = tokens.count_input(body["input"])
        except ValueError as e:
            raise BadRequest(str(e), "input") from None
        if len(items) > 2048:
            raise BadRequest("'input' may hold at most 2048 items", "input")
        dim = body.get("dimensions") or self.cfg.embedding_dim
        if not isinstance(dim, int) or not 1 <= dim <= 8192:
            raise BadRequest("dimensions must be an integer from 1 to 8192", "dimensions")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("encoding_format must be 'float' or 'base64'", "encoding_format")
        key = _content_key(b"emb:", body)
        data = []
        for i, item in enumerate(items):
            v = embed(item, dim)
            data.append({"object": "embedding", "index": i,
                         "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v})
        resp = {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        return Answer(resp, key, prompt, 0, prompt, model)

    def answer(self, url: str, body: Any) -> Answer:
        if url == "/v1/chat/completions":
            return self.answer_chat(body)
        if url == "/v1/embeddings":
            return self.answer_embeddings(body)
        raise BadRequest(f"unsupported url {url!r}", "url")

    # ------------------------------------------------------------------------------------- online endpoints
    async def chat(self, request: web.BaseRequest):
        return await self._online(request, self.answer_chat)

    async def embeddings(self, request: web.BaseRequest):
        return await self._online(request, self.answer_embeddings)

    async def _online(self, request: web.BaseRequest, compute):
        payload = request.content
        # A small body has usually arrived whole with its headers: take it without read()'s await loop.
        raw = payload.read_nowait(-1) if payload.is_eof() else await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest("We could not parse the JSON body of your request. [simulated]") from None
        if self.recent.maxlen:
            self.recent.append(body)
        ans = compute(body)
        cfg = self.cfg
        ledger = self.ledger
        if cfg.quota_after is not None and ledger.ok + ledger.batch_ok >= cfg.quota_after:
            ledger.rate_limited["insufficient_quota"] += 1
            return _json_response({"error": {
                "message": "You exceeded your current quota, please check your plan and billing details. "
                           "[simulated]",
                "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}, 429)
        limits = self._limits.get(ans.model) if self._limited_any else None
        if limits is None and self._limited_any:
            limits = self._limits[ans.model] = Limits(cfg.rpm, cfg.tpm, cfg.rps, cfg.limit_mode)
        headers: dict[str, str] = {}
        if limits is not None:
            now = time.monotonic()
            verdict = limits.admit(ans.charge, now)
            if not verdict.ok:
                return self._limited(limits, verdict, ans, now)
            if self._style != "none":
                headers.update(rate_headers(limits, self._style, now))
        self._ids += 1
        headers["x-request-id"] = f"req_sim{self._ids}"
        fault = self.faults.draw() if self.faults.active else None
        if fault is not None:
            ledger.faults[fault] += 1
            if fault == "500" or fault == "503":
                return _json_response(faults.error_body(int(fault)), int(fault), headers)
            if fault == "non_json":
                return faults.non_json()
            if fault == "reset":
                faults.reset(request)
                return None
            if fault == "truncated":
                faults.truncated(request, orjson.dumps(ans.body, option=_NUMPY))
                return None
        delay = self.delay_s(ans.completion, fault == "hang")
        if delay > 0:
            await asyncio.sleep(delay)
            transport = request.transport
            if fault == "hang" and cfg.hang_then == "close":
                if transport is not None:
                    transport.close()
                return None
            if transport is None or transport.is_closing():
                ledger.faults["client_gone"] += 1
                return None
        ledger.ok += 1
        ledger.answered(ans.key, ans.prompt, ans.completion)
        return _respond(request, 200, orjson.dumps(ans.body, option=_NUMPY), headers)

    def delay_s(self, completion_tokens: int, hang: bool = False) -> float:
        """Seconds before an answer: latency + per token x completion tokens + jitter (+ the hang)."""
        cfg = self.cfg
        ms = cfg.latency_ms + cfg.per_token_ms * completion_tokens
        if cfg.jitter_ms:
            ms += cfg.jitter_ms * self._jitter.random()
        if hang:
            ms += cfg.hang_s * 1000.0
        return ms / 1000.0

    def _limited(self, limits: Limits, verdict, ans: Answer, now: float) -> web.Response:
        style = self._style
        headers = rate_headers(limits, style, now)
        w = verdict.window
        if verdict.too_large:
            self.ledger.rate_limited["too_large"] += 1
            message = (f"Request too large for {ans.model} in organization org-sim on tokens per min (TPM): "
                       f"Limit {w.limit}, Requested {ans.charge}. The input or output tokens must be reduced in "
                       "order to run successfully. [simulated]")
        else:
            self.ledger.rate_limited[verdict.kind] += 1
            headers.update(retry_headers(style, verdict.retry_after))
            unit = "requests per min (RPM)" if verdict.kind == "requests" else "tokens per min (TPM)"
            if w is limits.rps:
                unit = "requests per second (RPS)"
            amount = 1 if verdict.kind == "requests" else ans.charge
            message = (f"Rate limit reached for {ans.model} in organization org-sim on {unit}: Limit {w.limit}, "
                       f"Used {w.used}, Requested {amount}. Please try again in "
                       f"{math.ceil(verdict.retry_after * 1000)}ms. [simulated]")
        return _json_response({"error": {"message": message, "type": verdict.kind, "param": None,
                                         "code": "rate_limit_exceeded"}}, 429, headers)

    async def models(self, request: web.BaseRequest) -> web.Response:
        return _json_response({"object": "list", "data": [self._model(m) for m in MODELS]})

    def model(self, model_id: str) -> web.Response:
        return _json_response(self._model(model_id))

    @staticmethod
    def _model(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "tcia-sim"}


class Simulator:
    """The simulator on a free (or the configured) port of 127.0.0.1, as an async context manager.

    Inside `async with`, `base_url` is `http://HOST:PORT/v1`; on exit the server stops accepting, in-flight
    requests get `shutdown_s` to finish and are then cancelled, and batch timers are cancelled.
    """

    def __init__(self, config: SimConfig | None = None, *, shutdown_s: float = 1.0, **overrides: Any) -> None:
        cfg = config or SimConfig()
        if overrides:
            cfg = SimConfig(**{**{f: getattr(cfg, f) for f in cfg.__struct_fields__}, **overrides})
        self.config = cfg
        self.handlers = Handlers(cfg)
        self._shutdown_s = shutdown_s
        self._stack: AsyncExitStack | None = None
        self.host = cfg.host
        self.port: int = 0

    @property
    def url(self) -> str:
        """The server root, `http://HOST:PORT` (GET /sim/stats lives here)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, `http://HOST:PORT/v1`."""
        return self.url + "/v1"

    def stats(self) -> dict:
        """The ledger, as GET /sim/stats returns it."""
        return self.handlers.ledger.snapshot()

    def reset(self) -> None:
        """Clear the ledger, the rate-limit windows and the prompt cache, as POST /sim/reset does."""
        self.handlers.reset()

    def bodies(self) -> list:
        """The last `record_bodies` request bodies received (chat and embeddings), oldest first."""
        return list(self.handlers.recent)

    def advance_batches(self) -> None:
        """With `batch_delay_s=None`: move every unfinished batch one step (validating -> in_progress ->
        completed)."""
        self.handlers.batches.advance_all()

    async def wait_requests(self, n: int) -> None:
        """Wait (on events, no polling) until the ledger has counted at least `n` requests since the last reset;
        e.g. to act while a request is known to be in flight."""
        await self.handlers.wait_requests(n)

    async def wait_batch(self, batch_id: str, status: str) -> dict:
        """Wait (on events, no polling) until the batch reaches `status` or a terminal state; its object."""
        return await self.handlers.batches.wait(batch_id, status)

    async def __aenter__(self) -> Simulator:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # runs before the group exits: stops batch timers
            self.handlers.batches.spawn = tg.start_soon
            max_size = int(self.config.max_body_mb * 1024 * 1024)

            def make_request(message, payload, protocol, writer, task):
                return web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(),
                                       client_max_size=max_size)

            server = web.Server(self.handlers.handle, request_factory=make_request, access_log=None)
            runner = web.ServerRunner(server, shutdown_timeout=self._shutdown_s)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.config.port))
            except OSError:
                sock.close()
                raise
            self.port = sock.getsockname()[1]
            site = web.SockSite(runner, sock, backlog=4096)
            await site.start()
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(*exc)

    async def serve_until(self, stop: anyio.Event) -> None:
        """Serve until `stop` is set (for the CLI and SimThread)."""
        async with self:
            await stop.wait()


class SimThread:
    """The same simulator on its own event loop in a background thread, for sync code and subprocess tests.

    `with SimThread(cfg) as sim:` returns once the server accepts connections; leaving the block stops it and
    joins the thread.
    """

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        self.sim = Simulator(config, **overrides)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return self.sim.base_url

    @property
    def url(self) -> str:
        return self.sim.url

    @property
    def port(self) -> int:
        return self.sim.port

    def bodies(self) -> list:
        return self._call(self.sim.bodies)

    @property
    def config(self) -> SimConfig:
        return self.sim.config

    def _call(self, fn, *args):
        async def run():
            return fn(*args)

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stats(self) -> dict:
        return self._call(self.sim.stats)

    def reset(self) -> None:
        self._call(self.sim.reset)

    def advance_batches(self) -> None:
        self._call(self.sim.advance_batches)

    def wait_requests(self, n: int, timeout: float | None = None) -> None:
        """Block until the server has counted at least `n` requests (TimeoutError after `timeout` seconds)."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self.sim.wait_requests(n), self._loop)
        try:
            fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self.sim:
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:
            self._error = e
            self._ready.set()

    def __enter__(self) -> SimThread:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="tcia-sim", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join()
