"""Settings as msgspec Structs, loadable from TOML, with one validation whatever their source.

Every setting has a sensible default, so `EngineConfig(base_url=...)` is a working configuration. A TOML file may
hold an `[engine]` table (and one table per pipeline stage: `RunConfig` in the pipeline); command-line flags
and environment variables override it. `load_engine_config` merges the sources and remembers where each value
came from, so that an error names the flag, the environment variable or the file and key that set it.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec


class ConfigError(Exception):
    """A setting is missing or wrong. The message names where it came from and what is wrong."""


class Limits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A provider's budget for one (provider, model). None means: not limited (or learned from headers)."""

    rpm: float | None = None
    tpm: float | None = None
    rps: float | None = None
    tps: float | None = None


class Price(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """USD per 1M tokens, for the cost estimate."""

    input: float = 0.0
    output: float = 0.0
    # Prompt tokens the provider served from its prompt cache (`cached_tokens`); None: billed as `input`.
    cached_input: float | None = None


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
    # Nothing but transient failures (no connection, 5xx, timeouts) for this long: stop the run (exit 3) instead
    # of spending every request's attempts. A rerun continues.
    unreachable_after: float = 120.0
    # An answer body longer than this fails its request (an endless body must not take the memory).
    max_response_bytes: int = 256 * 1024 * 1024
    # Grace period for in-flight requests after Ctrl-C.
    drain_timeout: float = 30.0
    # Content-addressed response cache (SQLite, WAL). None = no cache.
    cache_path: str | None = None
    # Answers asked for a JSON schema: at most this many per call (the first and its corrections).
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
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{p}: config file cannot be read (permission denied)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def convert(data: Any, typ: type, source: str) -> Any:
    """Turn a TOML table into a settings Struct, naming the file and the offending key on error."""
    try:
        return msgspec.convert(data, typ, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None


# -- validation -----------------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(value: Any, where: str, *, low: float = 0.0, strict: bool = True, whole: bool = False,
                 none_means: str | None = None) -> None:
    """A finite number above `low` (or at least it when not `strict`), or ConfigError naming `where`."""
    if value is None and none_means is not None:
        return
    bound = f"> {low:g}" if strict else f">= {low:g}"
    what = "a whole number" if whole else "a finite number"
    hint = f" (leave it out for {none_means})" if none_means else ""
    if not _number(value) or not math.isfinite(value) or (whole and value != int(value)) \
            or (value <= low if strict else value < low):
        raise ConfigError(f"{where} = {value!r}: must be {what} {bound}{hint}")


# (setting, low, strict, whole); None means the setting may be absent, with that meaning.
_ENGINE_RULES: list[tuple[str, float, bool, bool]] = [
    ("concurrency", 1, False, True),
    ("max_attempts", 1, False, True),
    ("timeout", 0, True, False),
    ("backoff_base", 0, False, False),
    ("backoff_cap", 0, False, False),
    ("unreachable_after", 0, True, False),
    ("max_response_bytes", 1024, False, True),
    ("drain_timeout", 0, False, False),
    ("schema_attempts", 1, False, True),
    ("embedding_batch_size", 1, False, True),
    ("embedding_batch_tokens", 1, False, True),
]


def validate_engine(cfg: EngineConfig, where: Mapping[str, str] | None = None) -> EngineConfig:
    """Check every engine setting (finite, in range); `where` maps a setting to the flag, variable or file key
    that set it, for the message. Returns `cfg`."""
    where = where or {}

    def name(key: str) -> str:
        return where.get(key) or f"engine.{key}"

    for key, low, strict, whole in _ENGINE_RULES:
        check_number(getattr(cfg, key), name(key), low=low, strict=strict, whole=whole)
    for field in ("rpm", "tpm", "rps", "tps"):
        check_number(getattr(cfg.limits, field), name(f"limits.{field}"), none_means="no limit")
    for model, lim in cfg.model_limits.items():
        for field in ("rpm", "tpm", "rps", "tps"):
            check_number(getattr(lim, field), name(f"model_limits.{model}.{field}"), none_means="no limit")
    for model, price in cfg.prices.items():
        for field in ("input", "output", "cached_input"):
            check_number(getattr(price, field), name(f"prices.{model}.{field}"), strict=False,
                         none_means="the input price" if field == "cached_input" else None)
    for key in ("base_url", "embedding_base_url"):
        url = getattr(cfg, key)
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{name(key)} = {url!r}: must start with http:// or https://")
    return cfg


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for k, v in table.items():
        if isinstance(v, Mapping):
            keys += _flatten(v, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


def load_engine_config(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None,
                       origins: Mapping[str, str] | None = None, **kw_overrides: Any) -> EngineConfig:
    """Engine settings: the `[engine]` table of an optional TOML file, then `overrides` (setting -> value,
    dotted for nested ones such as "limits.rpm"; None = not given), validated.

    `origins` names where each override came from ("--rpm", "$OPENAI_BASE_URL"), for error messages.
    """
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    source = "settings"
    if path is not None:
        source = str(path)
        doc = load_toml(path)
        table = doc.get("engine", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [engine] must be a table")
        data.update(table)
        for key in _flatten(table):
            where[key] = f"{source}: [engine] {key}"
    merged = {**(overrides or {}), **kw_overrides}
    for key, value in merged.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        where[key] = (origins or {}).get(key, f"{key} (given)")
    try:
        cfg = msgspec.convert(data, EngineConfig, strict=False)
    except msgspec.ValidationError as exc:
        # "... - at `$.limits.rpm`": name the flag or file key that set it.
        text = str(exc)
        at = text.rsplit("at `$.", 1)[-1].rstrip("`") if "at `$." in text else ""
        origin = where.get(at)
        raise ConfigError(f"{origin}: {text.split(' - at ')[0]}" if origin else f"{source}: {text}") from None
    return validate_engine(cfg, where)
