"""`tcia-async sim`: run the simulator until Ctrl-C or SIGTERM.

Prints exactly one line `listening on http://HOST:PORT/v1` to stdout (flushed) once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys


def _rate(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return v


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The simulator's flags (help texts name units and defaults)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    g.add_argument("--port", type=_port, default=8000, help="port; 0 picks a free one (default 8000)")
    g.add_argument("--seed", type=int, default=0, help="seed of answers, faults and jitter (default 0)")

    g = p.add_argument_group("latency (zero by default: as fast as possible)")
    g.add_argument("--latency-ms", type=float, default=0.0, help="base latency per answer in ms")
    g.add_argument("--per-token-ms", type=float, default=0.0, help="extra ms per completion token")
    g.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform random ms in [0, J)")

    g = p.add_argument_group("rate limits (rolling windows; a request costs prompt tokens + max_tokens)")
    g.add_argument("--rpm", type=_positive_int, help="requests per minute")
    g.add_argument("--tpm", type=_positive_int, help="tokens per minute; a request above it is 'too large'")
    g.add_argument("--rps", type=_positive_int, help="requests per second")
    g.add_argument("--limit-mode", choices=("window", "bucket"), default="window",
                   help="window: at most N in any rolling window (default); bucket: N that refill "
                   "continuously at N per window, starting full")
    g.add_argument("--headers", choices=("openai", "anthropic", "none"), default="openai",
                   help="rate-limit headers: x-ratelimit-* + retry-after-ms (openai, default), "
                   "anthropic-ratelimit-* with RFC 3339 resets, or none at all")
    g.add_argument("--quota-after", type=int, metavar="N",
                   help="answer 429 insufficient_quota once N requests were answered (0: always)")
    g.add_argument("--api-key", help="accept only this bearer key (others get 401); default: any key")

    g = p.add_argument_group("faults (probabilities per request, seeded)")
    g.add_argument("--error-rate", type=_rate, default=0.0,
                   help="spread evenly over 500, 503, reset, truncated and non-JSON (not hangs)")
    g.add_argument("--rate-500", type=_rate, default=0.0, help="500 server_error")
    g.add_argument("--rate-503", type=_rate, default=0.0, help="503 overloaded")
    g.add_argument("--rate-reset", type=_rate, default=0.0, help="connection reset (TCP RST)")
    g.add_argument("--rate-truncated", type=_rate, default=0.0,
                   help="200 with a body shorter than its Content-Length, then close")
    g.add_argument("--rate-non-json", type=_rate, default=0.0, help="200 with an HTML body")
    g.add_argument("--rate-hang", type=_rate, default=0.0, help="hang for --hang-s before answering")
    g.add_argument("--hang-s", type=float, default=30.0, help="length of a hang in seconds (default 30)")
    g.add_argument("--hang-then", choices=("answer", "close"), default="answer",
                   help="after a hang: answer normally (default) or close the connection")

    g = p.add_argument_group("batches and embeddings")
    g.add_argument("--batch-delay", type=float, default=1.0, metavar="S",
                   help="seconds from batch creation to completion (default 1)")
    g.add_argument("--batch-fail-rate", type=_rate, default=0.0,
                   help="share of batch lines that fail with 500 (into the error file)")
    g.add_argument("--embedding-dim", type=_positive_int, default=384, help="default embedding size (384)")


def config_from_args(args: argparse.Namespace):
    from tcia_async.sim.config import SimConfig

    return SimConfig(
        host=args.host, port=args.port, seed=args.seed,
        latency_ms=args.latency_ms, per_token_ms=args.per_token_ms, jitter_ms=args.jitter_ms,
        rpm=args.rpm, tpm=args.tpm, rps=args.rps, limit_mode=args.limit_mode, headers=args.headers,
        quota_after=args.quota_after,
        api_key=args.api_key,
        error_rate=args.error_rate, rate_500=args.rate_500, rate_503=args.rate_503, rate_reset=args.rate_reset,
        rate_truncated=args.rate_truncated, rate_non_json=args.rate_non_json, rate_hang=args.rate_hang,
        hang_s=args.hang_s, hang_then=args.hang_then,
        batch_delay_s=args.batch_delay, batch_fail_rate=args.batch_fail_rate, embedding_dim=args.embedding_dim,
    )


async def _serve(cfg) -> None:
    from tcia_async.sim.server import Simulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Simulator(cfg) as sim:
        # A server process: long-lived objects out of the collector's way, fewer young collections.
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        print(f"listening on {sim.base_url}", flush=True)
        await stop.wait()
    print("simulator stopped", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 for a bad setting (e.g. fault rates above 1)."""
    try:
        cfg = config_from_args(args)
        from tcia_async.sim.faults import FaultPlan

        FaultPlan(cfg)  # validates the rates before binding
    except ValueError as e:
        print(f"tcia-async sim: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(cfg))
    except OSError as e:  # e.g. the port is taken
        print(f"tcia-async sim: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tcia_async.sim", description="OpenAI-compatible simulator.")
    add_arguments(p)
    return run(p.parse_args(argv))
