"""Settings of the simulator. Every field has a default that makes a fast, fault-free, unlimited server."""

from __future__ import annotations

from typing import Literal

import msgspec


class SimConfig(msgspec.Struct, kw_only=True):
    """What the simulator does. Times in the units their names say; rates are probabilities per request.

    Limits (`rpm`, `tpm`, `rps`) are rolling windows (60 s, 60 s, 1 s), one set per model; `None` means
    unlimited. A chat request costs one request and `prompt tokens + max_tokens` tokens (OpenAI's accounting;
    without `max_tokens` the simulator charges the completion it is going to produce); an embeddings request
    costs its input tokens.
    """

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, see Simulator.base_url
    seed: int = 0

    # Latency: base + per output token + uniform jitter in [0, jitter_ms).
    latency_ms: float = 0.0
    per_token_ms: float = 0.0
    jitter_ms: float = 0.0

    # Rate limits over rolling windows.
    rpm: int | None = None
    tpm: int | None = None
    rps: int | None = None
    limit_mode: Literal["window", "bucket"] = "window"  # see limits.py
    headers: Literal["openai", "anthropic", "none"] = "openai"
    quota_after: int | None = None  # 429 insufficient_quota once this many requests were answered (0: always)
    api_key: str | None = None  # when set, any other bearer key gets 401

    # Faults, each a probability per request drawn from a seeded stream (not from the body, so a retry of a
    # failed request can succeed). `error_rate` is spread evenly over the kinds that do not hang.
    error_rate: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_reset: float = 0.0
    rate_truncated: float = 0.0
    rate_non_json: float = 0.0
    rate_hang: float = 0.0
    hang_s: float = 30.0
    hang_then: Literal["answer", "close"] = "answer"

    # Batches: validating for half the delay, in_progress for the other half, then completed.
    # None: batches advance only when Simulator.advance_batches() is called (for tests).
    batch_delay_s: float | None = 1.0
    batch_fail_rate: float = 0.0  # share of batch lines answered with a 500 in the error file
    # The first N batches to finish expire instead: the first half of their lines are answered (output file), the
    # rest go to the error file with code `batch_expired`, as OpenAI reports requests the window did not reach.
    batch_expire: int = 0
    # Enqueued-token limit per model (prompt tokens of the batches in progress): a batch that would go over it
    # fails at validation with code `token_limit_exceeded` ("validate"), or its create is answered 400 with that
    # code ("create"). None: no limit.
    batch_enqueued_tokens: int | None = None
    batch_token_limit_at: Literal["validate", "create"] = "validate"
    # File uploads answered 429 insufficient_quota once this many uploads were accepted (0: every upload).
    upload_quota_after: int | None = None

    embedding_dim: int = 384
    record_bodies: int = 0  # keep the last N request bodies (chat and embeddings) for Simulator.bodies()
    max_body_mb: float = 256.0  # largest request body (file uploads)
