"""Rate limits over rolling windows (RPM, TPM, RPS) and the headers that report them.

Semantics, stated exactly:
- A request is admitted iff, for every configured window, the amount admitted during the last `window` seconds
  plus this request's amount stays within the limit. Rejected requests cost nothing.
- Amounts admitted within `_MERGE_S` of each other share one entry whose time is the latest of them; an entry
  leaves the window `window` seconds after that latest time. This only ever delays expiry, so no true rolling
  window ever holds more than the limit.
- `remaining` is limit - amount in the window after this request; `reset` is the time until the window is empty
  again ("resets to its initial state", OpenAI's definition); `retry_after` (429 only) is the time until this
  very request would be admitted.
- `limit_mode="bucket"` replaces each window by a bucket of the same size that refills continuously
  (limit / window per second) and starts full: bursts are bounded by the limit, then the rate is steady, as
  providers that "quantise" their limits behave. Headers then report the bucket's level and time to full.
"""

from __future__ import annotations

import math
import time
from collections import deque
from datetime import UTC, datetime, timedelta

_MERGE_S = 0.005


class Window:
    """Amounts admitted during the last `window` seconds, against `limit`."""

    __slots__ = ("_entries", "limit", "used", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._entries: deque[list] = deque()  # [first_t, last_t, amount]
        self.used = 0

    def expire(self, now: float) -> None:
        entries = self._entries
        cutoff = now - self.window
        while entries and entries[0][1] <= cutoff:
            self.used -= entries.popleft()[2]

    def fits(self, amount: int) -> bool:
        return self.used + amount <= self.limit

    def add(self, amount: int, now: float) -> None:
        entries = self._entries
        if entries and now - entries[-1][0] < _MERGE_S:
            last = entries[-1]
            last[1] = now
            last[2] += amount
        else:
            entries.append([now, now, amount])
        self.used += amount

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until `amount` fits (inf if it never can)."""
        if amount > self.limit:
            return math.inf
        excess = self.used + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for _, last_t, a in self._entries:
            freed += a
            if freed >= excess:
                return max(0.0, last_t + self.window - now)
        return self.window  # unreachable while used is consistent

    def reset_in(self, now: float) -> float:
        if not self._entries:
            return 0.0
        return max(0.0, self._entries[-1][1] + self.window - now)

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0


class Bucket:
    """The continuous-refill alternative to Window (`limit_mode="bucket"`): `limit` units that refill at
    `limit / window` per second, starting full. `used` is what the bucket lacks to be full (fractional)."""

    __slots__ = ("_level", "_rate", "_t", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._rate = limit / window
        self._level = float(limit)
        self._t = 0.0

    @property
    def used(self) -> int:
        return self.limit - math.floor(self._level + 1e-9)

    def expire(self, now: float) -> None:
        if now > self._t:
            self._level = min(float(self.limit), self._level + (now - self._t) * self._rate)
            self._t = now

    def fits(self, amount: int) -> bool:
        return self._level + 1e-9 >= amount

    def add(self, amount: int, now: float) -> None:
        self.expire(now)
        self._level -= amount

    def wait_for(self, amount: int, now: float) -> float:
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self._level) / self._rate)

    def reset_in(self, now: float) -> float:
        return max(0.0, (self.limit - self._level) / self._rate)

    def clear(self) -> None:
        self._level = float(self.limit)


class Verdict:
    """The outcome of `Limits.admit` for one request."""

    __slots__ = ("kind", "ok", "retry_after", "too_large", "window")

    def __init__(self, ok: bool, kind: str = "", retry_after: float = 0.0, too_large: bool = False,
                 window: Window | None = None) -> None:
        self.ok = ok
        self.kind = kind  # "requests" or "tokens" when not ok
        self.retry_after = retry_after
        self.too_large = too_large
        self.window = window


_OK = Verdict(True)


class Limits:
    """The RPM / TPM / RPS windows (or buckets) of one simulator (all models share them)."""

    def __init__(self, rpm: int | None, tpm: int | None, rps: int | None, mode: str = "window") -> None:
        kind = Bucket if mode == "bucket" else Window
        self.rpm = kind(rpm, 60.0) if rpm else None
        self.tpm = kind(tpm, 60.0) if tpm else None
        self.rps = kind(rps, 1.0) if rps else None
        self.active = bool(rpm or tpm or rps)

    def admit(self, tokens: int, now: float) -> Verdict:
        """Admit one request costing `tokens` tokens, or say which window refuses it and for how long."""
        rpm, tpm, rps = self.rpm, self.tpm, self.rps
        if tpm is not None and tokens > tpm.limit:
            return Verdict(False, "tokens", math.inf, too_large=True, window=tpm)
        failing: list[tuple[str, Window, float]] = []
        for kind, w, amount in (("requests", rps, 1), ("requests", rpm, 1), ("tokens", tpm, tokens)):
            if w is None:
                continue
            w.expire(now)
            if not w.fits(amount):
                failing.append((kind, w, w.wait_for(amount, now)))
        if failing:
            kind, w, _ = failing[0]
            return Verdict(False, kind, max(f[2] for f in failing), window=w)
        if rps is not None:
            rps.add(1, now)
        if rpm is not None:
            rpm.add(1, now)
        if tpm is not None:
            tpm.add(tokens, now)
        return _OK

    def clear(self) -> None:
        for w in (self.rpm, self.tpm, self.rps):
            if w is not None:
                w.clear()


def go_duration(seconds: float) -> str:
    """Go's time.Duration text as OpenAI sends it: `12ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s` (rounded up to ms)."""
    ms = math.ceil(seconds * 1000 - 1e-9)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def _rfc3339(seconds_from_now: float) -> str:
    t = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rate_headers(limits: Limits, style: str, now: float) -> dict[str, str]:
    """The x-ratelimit-* (or anthropic-ratelimit-*) headers for the minute windows; empty for style "none"."""
    out: dict[str, str] = {}
    if style == "none":
        return out
    for name, w in (("requests", limits.rpm), ("tokens", limits.tpm)):
        if w is None:
            continue
        w.expire(now)
        remaining = max(0, w.limit - w.used)
        reset = w.reset_in(now)
        if style == "anthropic":
            out[f"anthropic-ratelimit-{name}-limit"] = str(w.limit)
            out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
            out[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(reset)
        else:
            out[f"x-ratelimit-limit-{name}"] = str(w.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(remaining)
            out[f"x-ratelimit-reset-{name}"] = go_duration(reset)
    return out


def retry_headers(style: str, retry_after: float) -> dict[str, str]:
    """`retry-after` (whole seconds, rounded up) and, OpenAI style, `retry-after-ms`."""
    if style == "none" or math.isinf(retry_after):
        return {}
    out = {"retry-after": str(max(1, math.ceil(retry_after)))}
    if style == "openai":
        out["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
    return out


monotonic = time.monotonic
