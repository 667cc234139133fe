"""A small server on 127.0.0.1 that answers chat requests in odd but possible ways, for the cases the simulator
does not cover. The answer depends on the user message:

- "cr": a valid answer whose JSON has bare carriage returns between tokens;
- "no-choices": a 200 with `"choices": []`;
- "endless": a 200 whose chunked body never ends;
- "500": a 500, every time;
- anything else: a plain valid answer.

Embeddings requests are refused with a 400 (the model is unknown), every time.

`with OddServer() as s:` serves on a thread; `s.base_url`, `s.requests` (count).
"""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

ANSWER = {"id": "chatcmpl-odd", "object": "chat.completion", "model": "odd",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


class OddServer:
    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        text = body["messages"][-1]["content"]
        if text == "cr":
            raw = json.dumps(ANSWER).replace(', "usage"', ',\r"usage"').encode()
            return web.Response(body=raw, content_type="application/json")
        if text == "500":
            return web.json_response({"error": {"message": "odd server error"}}, status=500)
        if text == "no-choices":
            return web.json_response({**ANSWER, "choices": []})
        if text == "endless":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b'{"choices": [{"message": {"content": "')
            chunk = b"x" * 65536
            try:
                while True:
                    await resp.write(chunk)
            except (ConnectionResetError, asyncio.CancelledError):
                return resp
        return web.json_response(ANSWER)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        return web.json_response({"error": {"message": "odd server: no such embedding model", "type":
                                            "invalid_request_error", "code": "model_not_found"}}, status=400)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> OddServer:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
