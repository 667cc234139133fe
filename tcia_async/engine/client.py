"""The HTTP side: one aiohttp session per base URL, OpenAI-compatible POSTs, failures below HTTP classified.

`Transport.post(url, data)` sends prepared JSON bytes and returns (status, headers, body), reading at most
`max_body` bytes: a larger (or endless) body is an error, so one answer cannot take the process's memory. A
failure below HTTP (timeout, refused or reset connection, truncated body) raises one of `TRANSPORT_ERRORS`, and
`Transport.verdict(exc)` classifies it. The connector's limit is raised to the engine's concurrency (aiohttp's
default of 100 starves a larger pool).

For the Batch API (engine/batch.py): `get`, `delete`, `upload` (a file from disk as multipart/form-data, streamed)
and `download` (a body streamed to a file on disk, so a large output file never sits in memory).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tcia_async import __version__
from tcia_async.engine.retry import Verdict, connection_verdict, timeout_verdict


class BodyTooLarge(Exception):
    """The answer's body was longer than the transport's cap."""


# What a failed exchange below HTTP raises: a timeout, or a refused, reset or truncated connection.
TRANSPORT_ERRORS = (asyncio.TimeoutError, aiohttp.ClientError, OSError)
# The ones raised before any connection was made: the request never reached the provider.
NOT_CONNECTED = (aiohttp.ClientConnectorError,)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def provider_of(base_url: str) -> str:
    """The provider part of a request's identity: scheme, host, port and path of the base URL, normalised
    (`https://API.openai.com/v1/` and `https://api.openai.com:443/v1` are one provider; ports differ: two)."""
    parts = urlsplit(base_url.strip())
    scheme = (parts.scheme or "http").lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = 0
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


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

    def __init__(self, base_url: str, api_key: str | None, concurrency: int, timeout: float,
                 max_body: int = 256 << 20) -> None:
        self.base_url = base_url
        self.provider = provider_of(base_url)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": f"tcia-async/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_body = max_body
        self._session: aiohttp.ClientSession | None = None

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
        return endpoint_url(self.base_url, path)

    async def post(self, url: str, data: bytes) -> tuple[int, Any, bytes]:
        """(status, headers, body) of the POST of `data` to `url`. Raises one of TRANSPORT_ERRORS, or
        BodyTooLarge past `max_body` bytes."""
        assert self._session is not None, "Transport.open() first"
        async with self._session.post(url, data=data) as resp:
            length = resp.content_length
            if length is not None and length <= self.max_body:
                return resp.status, resp.headers, await resp.read()
            return resp.status, resp.headers, await self._capped(resp)

    async def _capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body of `resp`, or BodyTooLarge past `max_body` bytes (an announced length is checked first)."""
        length = resp.content_length
        if length is not None and length > self.max_body:
            raise BodyTooLarge(f"answer of {length} bytes, over the cap of {self.max_body}")
        parts: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge(f"answer longer than the cap of {self.max_body} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def get(self, url: str) -> tuple[int, Any, bytes]:
        """(status, headers, body) of a GET (the same errors as `post`)."""
        assert self._session is not None, "Transport.open() first"
        async with self._session.get(url) as resp:
            return resp.status, resp.headers, await self._capped(resp)

    async def delete(self, url: str) -> tuple[int, Any, bytes]:
        assert self._session is not None, "Transport.open() first"
        async with self._session.delete(url) as resp:
            return resp.status, resp.headers, await self._capped(resp)

    async def upload(self, url: str, path: str | os.PathLike[str], fields: dict[str, str]) -> tuple[int, Any, bytes]:
        """POST the file at `path` as the multipart field `file` with `fields` beside it (OpenAI's /v1/files).
        The file is streamed from disk."""
        assert self._session is not None, "Transport.open() first"
        with open(path, "rb") as fh:
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, value)
            form.add_field("file", fh, filename=os.path.basename(path), content_type="application/jsonl")
            body = form()
            # The session's JSON content type would win over the form's: name the multipart one here.
            async with self._session.post(url, data=body, headers={"Content-Type": body.content_type}) as resp:
                return resp.status, resp.headers, await self._capped(resp)

    async def download(self, url: str, dest: str | os.PathLike[str]) -> tuple[int, Any, bytes]:
        """GET `url` into the file `dest` (any size, written as it arrives): (status, headers, b"") on a 200, else
        (status, headers, the error body) and `dest` is not written."""
        assert self._session is not None, "Transport.open() first"
        async with self._session.get(url) as resp:
            if resp.status != 200:
                return resp.status, resp.headers, await self._capped(resp)
            with open(dest, "wb") as fh:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    fh.write(chunk)
            return resp.status, resp.headers, b""

    def verdict(self, exc: BaseException) -> Verdict:
        """The retry verdict of a transport failure (one of TRANSPORT_ERRORS)."""
        if isinstance(exc, asyncio.TimeoutError):
            return timeout_verdict(self.timeout)
        return connection_verdict(exc)


__all__ = ["NOT_CONNECTED", "TRANSPORT_ERRORS", "BodyTooLarge", "Transport", "Verdict", "provider_of", "endpoint_url",
           "is_loopback"]
