"""The HTTP side: one aiohttp session per base URL, OpenAI-compatible POSTs, transport errors classified.

`Transport.request(url, data)` is the POST of prepared JSON bytes as an async context manager giving the
response (`status`, `headers`, `await read()`); the attempt loop (core.py) enters it itself, one coroutine layer
fewer per request than a wrapper would cost. A transport failure (timeout, refused or reset connection,
truncated body) is one of `TRANSPORT_ERRORS`, and `Transport.verdict(exc)` classifies it. The connector's limit
is raised to the engine's concurrency (aiohttp's default of 100 starves a larger pool) and the headers are built
once. The User-Agent is set in them rather than skipped: aiohttp turns a skip list into a new multidict on every
request.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tcia_async import __version__
from tcia_async.engine.retry import Verdict, connection_verdict, timeout_verdict


# What a failed exchange below HTTP raises: a timeout, or a refused, reset or truncated connection.
TRANSPORT_ERRORS = (asyncio.TimeoutError, aiohttp.ClientError, OSError)


def provider_of(base_url: str) -> str:
    """The provider part of a request's identity: the base URL's host name, lower-case (no port, no path)."""
    host = urlsplit(base_url).hostname
    return (host or base_url).lower()


def is_loopback(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def endpoint_url(base_url: str, path: str) -> str:
    """Join a base URL (`.../v1`) and a Batch-format url (`/v1/chat/completions`)."""
    base = base_url.rstrip("/")
    if path.startswith("/v1/") and base.endswith("/v1"):
        path = path[3:]
    return base + path


class Transport:
    """aiohttp session for one base URL. Use `await open()` / `await close()` (the Engine does)."""

    def __init__(self, base_url: str, api_key: str | None, concurrency: int, timeout: float) -> None:
        self.base_url = base_url
        self.provider = provider_of(base_url)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": f"tcia-async/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._concurrency = max(1, concurrency)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency,
                                         ttl_dns_cache=300, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
            auto_decompress=True, raise_for_status=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        u = self._urls.get(path)
        if u is None:
            u = self._urls[path] = endpoint_url(self.base_url, path)
        return u

    def request(self, url: str, data: bytes) -> Any:
        """The POST of `data` (JSON bytes) to `url`: `async with transport.request(url, data) as resp`. Raises
        one of TRANSPORT_ERRORS when the exchange fails below HTTP."""
        return self._session.post(url, data=data)  # type: ignore[union-attr]

    def verdict(self, exc: BaseException) -> Verdict:
        """The retry verdict of a transport failure (one of TRANSPORT_ERRORS)."""
        if isinstance(exc, asyncio.TimeoutError):
            return timeout_verdict(self.timeout)
        return connection_verdict(exc)  # type: ignore[arg-type]


__all__ = ["TRANSPORT_ERRORS", "Transport", "Verdict", "provider_of", "endpoint_url", "is_loopback"]
