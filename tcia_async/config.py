"""Settings as msgspec Structs, loadable from TOML with clear errors.

Every setting has a sensible default, so `EngineConfig(base_url=...)` is a working configuration. A TOML file
may hold an `[engine]` table (and later one table per stage); command-line flags override it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec


class ConfigError(Exception):
    """A setting is missing or wrong. The message names the file and the setting."""


class Limits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A provider's budget for one (provider, model). None means: not limited (or learn from headers)."""

    rpm: float | None = None
    tpm: float | None = None
    rps: float | None = None
    tps: float | None = None


class Price(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """USD per 1M tokens, for the cost estimate."""

    input: float = 0.0
    output: float = 0.0


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    base_url: str = "https://api.openai.com/v1"
    # Embeddings often live elsewhere (a local server, another provider); None = base_url.
    embedding_base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    embedding_api_key_env: str | None = None
    concurrency: int = 256
    limits: Limits = msgspec.field(default_factory=Limits)
    # Per-model overrides of `limits`, keyed by model name.
    model_limits: dict[str, Limits] = {}
    learn_limits_from_headers: bool = True
    max_attempts: int = 8
    timeout: float = 600.0
    backoff_base: float = 0.5
    backoff_cap: float = 60.0
    # Only connection errors (no answer at all) for this long: stop the run (exit 3) instead of failing every
    # request after its attempts. A rerun continues.
    unreachable_after: float = 120.0
    # Grace period for in-flight requests after Ctrl-C.
    drain_timeout: float = 30.0
    # Content-addressed response cache (SQLite, WAL). None = no cache.
    cache_path: str | None = None
    # Bounded retries of a model answer that fails its JSON schema.
    schema_attempts: int = 3
    # Embedding packing: inputs per call and tokens per call.
    embedding_batch_size: int = 256
    embedding_batch_tokens: int = 250_000
    prices: dict[str, Price] = {}

    def api_key(self, embeddings: bool = False) -> str | None:
        env = (self.embedding_api_key_env or self.api_key_env) if embeddings else self.api_key_env
        return os.environ.get(env)


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def convert(data: Any, typ: type, source: str) -> Any:
    """Turn a TOML table into a settings Struct, naming the file and the offending key on error."""
    try:
        return msgspec.convert(data, typ, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_engine_config(path: str | os.PathLike[str] | None, **overrides: Any) -> EngineConfig:
    """Engine settings from an optional TOML file's `[engine]` table, then keyword overrides (None = not given)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        table = load_toml(path).get("engine", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [engine] must be a table")
        data.update(table)
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    return convert(data, EngineConfig, source)
