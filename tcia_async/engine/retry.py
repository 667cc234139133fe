"""What is retried and how long to wait: the classification of every failed attempt.

Every failed attempt gets one of four verdicts:

- `RETRY`: transient (408, 409, 5xx, timeouts, connection errors, truncated or non-JSON bodies) -> exponential
  backoff with full jitter, capped; after `max_attempts` a recorded failure.
- `COOLDOWN`: 429 `rate_limit_exceeded` -> the (provider, model) budget waits until Retry-After / retry-after-ms /
  the reset header, then the request is retried (counts as an attempt).
- `FAIL`: 400, 404, 413, 422, 429 "request too large", other 4xx -> a recorded failure, never retried.
- `STOP`: 429 `insufficient_quota`, 401, 403 -> the run stops cleanly (state kept; rerun continues).

Error codes in results (`ErrorOut.code`) are stable strings: see the `code` values below.
"""

from __future__ import annotations

import random
import re
from typing import Any

import orjson

RETRY = 1
COOLDOWN = 2
FAIL = 3
STOP = 4


class Verdict:
    """The classification of one failed attempt."""

    __slots__ = ("kind", "code", "message", "status", "wait")

    def __init__(self, kind: int, code: str, message: str, status: int | None = None, wait: float | None = None):
        self.kind = kind
        self.code = code
        self.message = message
        self.status = status
        self.wait = wait  # seconds the server asked us to wait (Retry-After and kin), if it said

    def __repr__(self) -> str:
        return f"Verdict({self.kind}, {self.code!r}, status={self.status}, wait={self.wait})"


def _error_fields(body: bytes) -> tuple[str, str, str]:
    """(code, type, message) of an OpenAI-style error body; empty strings where absent or unparsable."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", "", body[:200].decode("utf-8", "replace")
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return (str(err.get("code") or ""), str(err.get("type") or ""), str(err.get("message") or ""))
    if isinstance(err, str):
        return "", "", err
    if isinstance(data, dict) and isinstance(data.get("message"), str):  # some gateways
        return str(data.get("code") or ""), str(data.get("type") or ""), data["message"]
    return "", "", body[:200].decode("utf-8", "replace")


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, `retry-after` (seconds or HTTP date), else None.

    A value that is zero, negative or not finite is no hint (None): it must not make a client retry at once or
    wait forever.
    """
    v = headers.get("retry-after-ms")
    if v:
        try:
            return _hint(float(v) / 1000.0)
        except ValueError:
            pass
    v = headers.get("retry-after")
    if v:
        try:
            return _hint(float(v))
        except ValueError:
            try:
                from email.utils import parsedate_to_datetime
                import time

                return _hint(parsedate_to_datetime(v).timestamp() - time.time())
            except (TypeError, ValueError, OverflowError):
                return None
    return None


def _hint(seconds: float) -> float | None:
    return seconds if 0.0 < seconds < float("inf") else None


_TOO_LARGE = re.compile(r"request too large|too many tokens|maximum context length|context_length_exceeded", re.I)


def classify_status(status: int, body: bytes, headers: Any) -> Verdict:
    """Classify a non-200 HTTP answer."""
    code, typ, message = _error_fields(body)
    msg = message or f"HTTP {status}"
    if status == 429:
        if code == "insufficient_quota" or typ == "insufficient_quota":
            return Verdict(STOP, "insufficient_quota", msg, status)
        if code in ("request_too_large", "context_length_exceeded") or _TOO_LARGE.search(message):
            return Verdict(FAIL, "request_too_large", msg, status)
        return Verdict(COOLDOWN, "rate_limited", msg, status, retry_after(headers))
    if status == 401:
        return Verdict(STOP, "unauthorized", msg, status)
    if status == 403:
        return Verdict(STOP, "forbidden", msg, status)
    if status in (408, 409) or status >= 500:
        return Verdict(RETRY, "server_error" if status >= 500 else ("timeout" if status == 408 else "conflict"), msg,
                       status, retry_after(headers))
    if status == 400:
        if code == "context_length_exceeded":
            return Verdict(FAIL, "request_too_large", msg, status)
        return Verdict(FAIL, "bad_request", msg, status)
    if status == 404:
        return Verdict(FAIL, "not_found", msg, status)
    if status == 413:
        return Verdict(FAIL, "request_too_large", msg, status)
    if status == 422:
        return Verdict(FAIL, "unprocessable", msg, status)
    return Verdict(FAIL, "http_error", msg, status)


def timeout_verdict(timeout: float) -> Verdict:
    return Verdict(RETRY, "timeout", f"no complete answer within {timeout:g} s")


def connection_verdict(exc: BaseException) -> Verdict:
    return Verdict(RETRY, "connection_error", f"{type(exc).__name__}: {exc}"[:300])


def invalid_body_verdict(status: int, why: str) -> Verdict:
    """A 200 whose body is truncated or not JSON (or not the expected shape): retried."""
    return Verdict(RETRY, "invalid_response", why, status)


def backoff(attempt: int, base: float, cap: float, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**(attempt-1))) for attempt >= 1."""
    ceiling = min(cap, base * (2.0 ** max(0, attempt - 1)))
    return rng.uniform(0.0, ceiling)
