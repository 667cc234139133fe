"""Fault injection: which fault (if any) hits the next request, and how each one misbehaves on the wire.

Faults are drawn from one seeded random stream in arrival order, not from the request body, so the same body
retried can get through; with the same seed and the same arrival order the same requests fail.
"""

from __future__ import annotations

import random
import socket
import struct

from aiohttp import web

from tcia_async.sim.config import SimConfig

# Kinds that `error_rate` spreads over: everything but the hang, which would stall a throughput run.
SPREAD = ("500", "503", "reset", "truncated", "non_json")
KINDS = (*SPREAD, "hang")


class FaultPlan:
    """Cumulative thresholds over the fault kinds; `draw()` returns a kind or None (one random number)."""

    def __init__(self, cfg: SimConfig) -> None:
        share = cfg.error_rate / len(SPREAD)
        rates = {
            "500": cfg.rate_500 + share,
            "503": cfg.rate_503 + share,
            "reset": cfg.rate_reset + share,
            "truncated": cfg.rate_truncated + share,
            "non_json": cfg.rate_non_json + share,
            "hang": cfg.rate_hang,
        }
        total = sum(rates.values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:.3f}, more than 1")
        self.active = total > 0
        self._rng = random.Random(cfg.seed ^ 0x5EED_FA17)
        self._cuts: list[tuple[float, str]] = []
        acc = 0.0
        for kind in KINDS:
            if rates[kind] > 0:
                acc += rates[kind]
                self._cuts.append((acc, kind))

    def draw(self) -> str | None:
        u = self._rng.random()
        for cut, kind in self._cuts:
            if u < cut:
                return kind
        return None


_SERVER_ERRORS = {
    500: ("The server had an error while processing your request. Sorry about that! [simulated]", "server_error"),
    503: ("The server is overloaded or not ready yet. [simulated]", "server_error"),
}


def error_body(status: int) -> dict:
    message, typ = _SERVER_ERRORS[status]
    return {"error": {"message": message, "type": typ, "param": None, "code": None}}


_HTML = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>" \
        b"<hr><center>simulated proxy (tcia-sim)</center></body></html>"


def non_json() -> web.Response:
    """A 200 whose body is an HTML error page, as a misbehaving proxy sends."""
    return web.Response(body=_HTML, status=200, headers={"Content-Type": "text/html"})


def reset(request: web.BaseRequest) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), so the client sees 'connection reset by peer'."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def truncated(request: web.BaseRequest, body: bytes) -> None:
    """Send a 200 that declares the full length but carries only half the body, then close the connection."""
    transport = request.transport
    if transport is None:
        return
    half = body[: len(body) // 2]
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    )
    transport.write(head + half)
    transport.close()  # flushes what was written, then FIN: the client reads a short body
