"""The HTTP side: one aiohttp session per base URL, OpenAI-compatible POSTs, transport errors classified.

A `Transport` sends prepared JSON bytes and returns `(status, body, headers)`; a transport failure (timeout,
refused or reset connection, truncated body) comes back as status 0 with a `Verdict` in place of the headers, so
the attempt loop never pays for an exception on the fast path. The connector's limit is raised to the engine's
concurrency (aiohttp's default of 100 starves a larger pool) and the headers are built once. The User-Agent is
set in them rather than skipped: aiohttp turns a skip list into a new multidict on every request.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tcia_async import __version__
from tcia_async.engine.retry import Verdict, connection_verdict, timeout_verdict


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

    async def post(self, url: str, data: bytes) -> tuple[int, bytes, Any]:
        """POST `data` (JSON bytes). Returns (status, body, headers) or (0, b"", Verdict) on a transport failure."""
        assert self._session is not None, "Transport.open() first"
        try:
            async with self._session.post(url, data=data) as resp:
                body = await resp.read()
                return resp.status, body, resp.headers
        except asyncio.TimeoutError:
            return 0, b"", timeout_verdict(self.timeout)
        except (aiohttp.ClientError, OSError) as exc:
            return 0, b"", connection_verdict(exc)


__all__ = ["Transport", "Verdict", "provider_of", "endpoint_url", "is_loopback"]
