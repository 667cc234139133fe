"""Settings as msgspec Structs, loadable from TOML, with one validation whatever their source.

Every setting has a sensible default, so `EngineConfig(base_url=...)` is a working configuration. A TOML file may
hold an `[engine]` table, a `[batch]` table and one table per pipeline stage (`RunConfig`). `read_settings` parses
it once and checks every table; the loaders then merge, lowest first, a command's fallbacks (e.g. an environment
variable), the file's table and the command-line flags, and remember where each value came from, so that an
error names the flag, the environment variable or the file and key that set it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
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


class SettingsFile(msgspec.Struct, frozen=True):
    """A settings file as parsed by `read_settings`: the loaders take it instead of a path, so that a command
    reads its file once."""

    path: str
    doc: dict[str, Any]

    def has(self, table: str, key: str) -> bool:
        section = self.doc.get(table)
        return isinstance(section, dict) and key in section


# What the loaders take: a file already read, a path (read and checked), or None for no file.
Source = SettingsFile | str | os.PathLike[str] | None


def read_settings(path: str | os.PathLike[str] | None) -> SettingsFile | None:
    """The settings file at `path` (None: no file), parsed once, with every table but `[engine]` checked (a
    misspelt table or key in a part this command does not use is still an error, not silently ignored).
    `[engine]` is checked by `load_engine_config`, which every command calls with its flags on top."""
    if path is None:
        return None
    settings = SettingsFile(path=str(path), doc=load_toml(path))
    load_run_config(settings)
    # Each value on its own: --poll-interval may yet make [batch] poll_max fit (load_batch_settings checks both).
    _load_table(BatchSettings, settings, "batch", check=_batch_values)
    return settings


def _settings(source: Source) -> SettingsFile | None:
    return source if source is None or isinstance(source, SettingsFile) else read_settings(source)


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


Rule = tuple  # (setting, low, strict, whole) or (setting, low, strict, whole, high); dotted for a nested table


def check_rules(cfg: Any, rules: list[Rule], name: Callable[[str], str]) -> None:
    """Check each rule's setting of `cfg` with `check_number` (and its upper bound), naming it with `name`."""
    for key, low, strict, whole, *high in rules:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        check_number(value, name(key), low=low, strict=strict, whole=whole)
        if high and high[0] is not None and value > high[0]:
            raise ConfigError(f"{name(key)} = {value!r}: must be at most {high[0]:g}")


_ENGINE_RULES: list[Rule] = [
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

    check_rules(cfg, _ENGINE_RULES, name)
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


def _flatten(table: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = []
    for k, v in table.items():
        if isinstance(v, Mapping):
            keys += _flatten(v, (*prefix, k))
        else:
            keys.append((*prefix, k))
    return keys


_BARE = re.compile(r"[A-Za-z0-9_-]+|\[\d+\]")


def dotted_key(parts: Sequence[str]) -> str:
    """`limits.rpm`, `"gpt-4.1"`, `generators[1]`: keys as a TOML file spells them (JSON paths too)."""
    out = ""
    for part in parts:
        if part.startswith("[") and _BARE.fullmatch(part):
            out += part
        else:
            out += ("." if out else "") + (part if _BARE.fullmatch(part) else msgspec.json.encode(part).decode())
    return out


def _origin(path: str, table: str | None, key: str | Sequence[str]) -> str:
    """How an error names a key of the file: "run.toml: [engine] limits.rpm", or with a key that must be quoted
    `run.toml: [engine.prices."gpt-4.1"] input` (`table` None: the key's first part is its table)."""
    parts = key.split(".") if isinstance(key, str) else list(key)
    if table is None and len(parts) > 1:
        table, parts = parts[0], parts[1:]
    if table is None:
        return f"{path}: {dotted_key(parts)}"
    if len(parts) > 1 and not all(_BARE.fullmatch(p) for p in parts):
        return f"{path}: [{dotted_key([table, *parts[:-1]])}] {dotted_key(parts[-1:])}"
    return f"{path}: [{table}] {dotted_key(parts)}"


def _put(data: dict[str, Any], key: str, value: Any, name: Callable[[str], str], keep: bool = False) -> bool:
    """Set the dotted `key` of `data` to `value` (`keep`: unless the key is there already). False when kept."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{name('.'.join(parents[: i + 1]))} must be a table")
    if keep and leaf in node:
        return False
    node[leaf] = value
    return True


def _load_table(typ: type, source: Source, table: str | None, merged: Mapping[str, Any] | None = None,
                origins: Mapping[str, str] | None = None, fallback: Mapping[str, tuple[Any, str]] | None = None,
                check: Callable[[Any, Mapping[str, str]], Any] | None = None) -> tuple[Any, dict[str, str]]:
    """(the `[table]` of a settings file as a `typ`, or with `table` None the file's stage tables as one; where
    each key came from). Lowest first: `fallback` (setting -> (value, where it came from)), the file, `merged`
    (setting -> value, None = not given; named by `origins`). Settings are dotted for nested ones.

    The file's table is first checked on its own, with `check(cfg, where)` too: a bad value in the file is an
    error naming its key even when a flag overrides it."""
    settings = _settings(source)
    path = settings.path if settings is not None else "settings"
    doc = settings.doc if settings is not None else {}
    if table is None:
        data = doc
    else:
        data = doc.get(table, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
    data = copy.deepcopy(data)  # the merges below must not change the file as read, which other loaders share

    def name(key: str) -> str:
        return where.get(key) or _origin(path, table, key)

    where: dict[str, str] = {".".join(key): _origin(path, table, key) for key in _flatten(data)}
    if settings is not None:
        own = _convert(data, typ, where, path, table)
        if check is not None:
            check(own, where)
    for key, (value, origin) in (fallback or {}).items():
        if value is not None and _put(data, key, value, name, keep=True):
            where[key] = origin
    for key, value in (merged or {}).items():
        if value is not None:
            _put(data, key, value, name)
            where[key] = (origins or {}).get(key, f"{key} (given)")
    return _convert(data, typ, where, path, table), where


def _convert(data: dict[str, Any], typ: type, where: Mapping[str, str], path: str, table: str | None) -> Any:
    """`data` as a `typ`, or ConfigError naming the flag or file key of the value msgspec refused."""
    try:
        return msgspec.convert(data, typ)
    except msgspec.ValidationError as exc:
        parts, what = explain(exc, data, typ)
        if table is None and len(parts) == 1 and what == "unknown key" and isinstance(data.get(parts[0]), dict):
            raise ConfigError(f"{path}: unknown table [{dotted_key(parts)}]") from None
        origin = where.get(".".join(parts)) or _origin(path, table, parts)
        raise ConfigError(f"{origin}: {what}" if parts or table else f"{path}: {what}") from None


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "array": "an array", "null": "null"}


def _type_words(spec: str, toml: bool) -> str:
    """msgspec's `float | null` as "a number" in TOML (which has no null), "a number or null" in JSON."""
    names = [n.strip() for n in spec.split("|")]
    if toml and len(names) > 1:
        names = [n for n in names if n != "null"]
    table = "a table" if toml else "an object"
    return " or ".join(table if n in ("object", "dict") else _TYPE_WORDS.get(n, n) for n in names)


_MSGSPEC = re.compile(r"(?:Object contains unknown field `(?P<unknown>[^`]*)`"
                      r"|Object missing required field `(?P<missing>[^`]*)`"
                      r"|Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`"
                      r"|(?P<other>.*?))(?: - at `\$(?P<at>[^`]*)`)?", re.S)


def explain(exc: msgspec.ValidationError, data: Any = None, typ: Any = None, *, toml: bool = True
            ) -> tuple[list[str], str]:
    """A msgspec validation error in the words of a settings file (`toml`) or a JSON line: (the keys leading to
    the value it refused, list indexes as "[1]"; what is wrong). Every loader says its errors through this. With
    the `data` and `typ` that were converted, a dict key msgspec leaves out (`$.prices[...]`) is found again."""
    text = str(exc)
    m = _MSGSPEC.fullmatch(text)
    if m is None:  # msgspec worded it otherwise: pass it on as it is
        return [], text
    parts = re.findall(r"\.([^.\[]+)|(\[[^\]]*\])", m["at"] or "")
    keys = [name or index for name, index in parts]
    if "[...]" in keys and data is not None and typ is not None:
        keys = _find_keys(keys, data, typ, text)
    if m["unknown"] is not None:
        return [*keys, m["unknown"]], "unknown key" if toml else "unknown field"
    if m["missing"] is not None:
        return [*keys, m["missing"]], "missing"
    if m["want"] is not None:
        got = "a decimal number" if m["got"] == "float" else _type_words(m["got"], toml)
        return keys, f"expected {_type_words(m['want'], toml)}, got {got}"
    other = m["other"]
    return keys, other[:1].lower() + other[1:]


def _find_keys(keys: list[str], data: Any, typ: Any, text: str) -> list[str]:
    """`keys` with each "[...]" (a dict key msgspec does not name) replaced by the key whose value alone fails
    with the same error."""
    keys = list(keys)
    for i, key in enumerate(keys):
        if key != "[...]":
            continue
        node = data
        for part in keys[:i]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            break
        for name, value in node.items():
            try:
                msgspec.convert(_only(data, keys[:i], {name: value}), typ)
            except msgspec.ValidationError as exc:
                if str(exc) == text:
                    keys[i] = name
                    break
    return keys


def _only(data: Any, keys: list[str], value: Any) -> Any:
    """`data` with the dict at `keys` replaced by `value` (the rest shared, not copied)."""
    if not keys:
        return value
    return {**data, keys[0]: _only(data[keys[0]], keys[1:], value)}


def load_engine_config(source: Source = None, overrides: Mapping[str, Any] | None = None,
                       origins: Mapping[str, str] | None = None,
                       fallback: Mapping[str, tuple[Any, str]] | None = None, **kw_overrides: Any) -> EngineConfig:
    """Engine settings: `fallback` (setting -> (value, its origin), e.g. from the environment), then the
    `[engine]` table of an optional settings file (a SettingsFile, or a path: read and checked), then
    `overrides` (setting -> value, dotted for nested ones such as "limits.rpm"; None = not given), validated.

    `origins` names where each override came from ("--rpm", "--base-url"), for error messages.
    """
    cfg, where = _load_table(EngineConfig, source, "engine", {**(overrides or {}), **kw_overrides}, origins,
                             fallback, check=validate_engine)
    return validate_engine(cfg, where)


# -- the Batch API mode ---------------------------------------------------------------------------------------


class BatchSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The Batch API mode (engine/batch.py), the `[batch]` table. Defaults are OpenAI's limits."""

    max_requests: int = 50_000  # lines per batch file
    max_bytes: int = 200_000_000  # bytes per batch file (OpenAI: 200 MB)
    # Prompt tokens a model may have in batches in progress (the provider's enqueued-token limit), for every
    # model unless `model_enqueued_tokens` names it; None: no limit. A batch file never holds more, and a batch
    # is created only when ours in progress leave room (one the provider refuses for it waits and is retried).
    enqueued_tokens: int | None = None
    model_enqueued_tokens: dict[str, int] = {}
    completion_window: str = "24h"
    poll_interval: float = 30.0  # seconds before the first status check of a batch; then longer, up to poll_max
    poll_max: float = 300.0
    # Failed (5xx), expired and cancelled lines are sent again in new batches this many times at most; then they
    # are recorded as failures of this run (a rerun tries them again). Permanent (400-class) failures never are.
    max_resubmits: int = 3
    discount: float = 0.5  # batch price = online price x discount (OpenAI: 50 % off)
    delete_files: bool = True  # delete our input, output and error files at the provider once a batch is settled

    def token_budget(self, model: str) -> int | None:
        return self.model_enqueued_tokens.get(model, self.enqueued_tokens)


_BATCH_RULES: list[Rule] = [
    ("max_requests", 1, False, True),
    ("max_bytes", 1024, False, True),
    ("poll_interval", 0, True, False),
    ("poll_max", 0, True, False),
    ("max_resubmits", 0, False, True),
    ("discount", 0, False, False),
]


def validate_batch(cfg: BatchSettings, where: Mapping[str, str] | None = None, *, together: bool = True
                   ) -> BatchSettings:
    """Check every batch setting; `together` False: each on its own (a flag may still change the other one of
    poll_interval and poll_max)."""
    where = where or {}

    def name(key: str) -> str:
        return where.get(key) or f"batch.{key}"

    check_rules(cfg, _BATCH_RULES, name)
    if cfg.discount > 1:
        raise ConfigError(f"{name('discount')} = {cfg.discount!r}: must be at most 1 (0.5: half the online price)")
    if together and cfg.poll_max < cfg.poll_interval:
        raise ConfigError(f"{name('poll_max')} = {cfg.poll_max!r}: must be at least poll_interval "
                          f"({cfg.poll_interval:g})")
    check_number(cfg.enqueued_tokens, name("enqueued_tokens"), low=1, strict=False, whole=True,
                 none_means="no limit")
    for model, n in cfg.model_enqueued_tokens.items():
        check_number(n, name(f"model_enqueued_tokens.{model}"), low=1, strict=False, whole=True)
    if not cfg.completion_window.strip():
        raise ConfigError(f"{name('completion_window')}: empty (OpenAI accepts \"24h\")")
    return cfg


def _batch_values(cfg: BatchSettings, where: Mapping[str, str]) -> None:
    validate_batch(cfg, where, together=False)


def load_batch_settings(source: Source = None, overrides: Mapping[str, Any] | None = None,
                        origins: Mapping[str, str] | None = None) -> BatchSettings:
    """Batch settings: the `[batch]` table of an optional settings file (a SettingsFile or a path), then
    `overrides` (None = not given), validated; errors name the flag or file key (as `load_engine_config`)."""
    cfg, where = _load_table(BatchSettings, source, "batch", overrides, origins, check=_batch_values)
    return validate_batch(cfg, where)


# -- the TCIA run ---------------------------------------------------------------------------------------------


class _Stage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What every LLM stage table may set; None: the run's model, the provider's default temperature, the run's
    mode ("online", or "batch": the provider's Batch API; verify and refine follow compose's)."""

    model: str | None = None
    temperature: float | None = None
    mode: str | None = None


class RunSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    seed: int = 0
    model: str = "gpt-4.1-mini"  # every stage that names no model of its own
    method: str = "tcia"  # or "evol": the Evol-Instruct baseline
    embedding_model: str | None = None  # None: the task database's
    mode: str = "online"  # of every stage that names none: "online" or "batch"
    # The report's diversity: at most this many instructions of each seed and hop are embedded (a seeded sample;
    # 0: all). Embedding is the slow part with the in-process model.
    diversity_sample: int = 50


class ExploreSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Algorithm 1 (Ma et al., arXiv 2508.20374): the paper's K, m, k, and our rules."""

    queue_limit: int = 2700  # K
    repeats: int = 10  # m
    sample: int = 2000  # k: sets sampled from all generated, per seed
    literal: bool = False  # True: Algorithm 1 exactly as printed (no dedup, no skip rules)
    replace_choices: int = 3  # Replace picks among this many most similar pool constraints
    # Ours: sets deeper than this are not generated (0: no limit; ignored when literal). Taken literally the search
    # stops at hop 3; deduplicated, the queue fills more slowly and would go deeper than the paper's sets.
    max_hop: int = 3


class ComposeSection(_Stage, kw_only=True):
    refine_attempts: int = 3


class ValidateSection(_Stage, kw_only=True):
    min_validity: int = 4
    min_consistency: int = 4


class ContextsSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    per_instruction: int = 5


class RespondSection(_Stage, kw_only=True):
    generators: list[str] = msgspec.field(default_factory=lambda: ["gpt-4.1-mini", "gpt-4.1-nano"])
    max_tokens: int | None = None


class JudgeSection(_Stage, kw_only=True):
    model: str | None = "gpt-4.1"
    preference_margin: float = 1.0  # best and worst mean scores must differ by this for a preference pair


class EvolSection(_Stage, kw_only=True):
    hops: int = 3
    per_hop: int = 0  # instructions per hop; 0: as many as a TCIA run with the same settings would sample


class RunConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `[run]` and stage tables of a run's TOML file; `[engine]` is EngineConfig's."""

    run: RunSection = msgspec.field(default_factory=RunSection)
    decompose: _Stage = msgspec.field(default_factory=_Stage)
    explore: ExploreSection = msgspec.field(default_factory=ExploreSection)
    compose: ComposeSection = msgspec.field(default_factory=ComposeSection)
    verify: _Stage = msgspec.field(default_factory=_Stage)
    validate: ValidateSection = msgspec.field(default_factory=ValidateSection)
    on_task: _Stage = msgspec.field(default_factory=_Stage)
    contexts: ContextsSection = msgspec.field(default_factory=ContextsSection)
    respond: RespondSection = msgspec.field(default_factory=RespondSection)
    judge: JudgeSection = msgspec.field(default_factory=JudgeSection)
    evol: EvolSection = msgspec.field(default_factory=EvolSection)
    engine: dict[str, Any] = {}  # checked by load_engine_config
    batch: dict[str, Any] = {}  # checked by load_batch_settings

    def mode_of(self, stage: str) -> str:
        """How a stage's requests go: "online" or "batch" (its own setting, else the run's)."""
        return getattr(getattr(self, stage, None), "mode", None) or self.run.mode

    def model_of(self, stage: str) -> str:
        """The model a stage uses: its own, else the run's."""
        section = getattr(self, stage, None)
        return (getattr(section, "model", None) or self.run.model)

    def temperature_of(self, stage: str) -> float | None:
        return getattr(getattr(self, stage, None), "temperature", None)


# (table.key, low, strict, whole, high)
_RUN_RULES: list[Rule] = [
    ("run.diversity_sample", 0, False, True, None),
    ("explore.queue_limit", 1, False, True, None),
    ("explore.repeats", 1, False, True, None),
    ("explore.sample", 1, False, True, None),
    ("explore.replace_choices", 1, False, True, None),
    ("explore.max_hop", 0, False, True, None),
    ("compose.refine_attempts", 0, False, True, None),
    ("validate.min_validity", 1, False, True, 5),
    ("validate.min_consistency", 1, False, True, 5),
    ("contexts.per_instruction", 1, False, True, None),
    ("judge.preference_margin", 0, False, False, 4),
    ("evol.hops", 1, False, True, None),
    ("evol.per_hop", 0, False, True, None),
]
_LLM_STAGES = ("decompose", "compose", "verify", "validate", "on_task", "respond", "judge", "evol")


def validate_run(cfg: RunConfig, where: Mapping[str, str] | None = None) -> RunConfig:
    where = where or {}

    def name(key: str) -> str:
        return where.get(key) or key

    check_rules(cfg, _RUN_RULES, name)
    check_number(cfg.run.seed, name("run.seed"), low=0, strict=False, whole=True)
    for stage in ("run", *_LLM_STAGES):
        mode = getattr(getattr(cfg, stage), "mode", None)
        if mode is not None and mode not in ("online", "batch"):
            raise ConfigError(f"{name(stage + '.mode')} = {mode!r}: must be \"online\" or \"batch\"")
    if cfg.verify.mode is not None:
        # Verification runs inside compose's stage (pipeline.py): its requests go through compose's BatchGate.
        raise ConfigError(f"{name('verify.mode')}: verify has no mode of its own: it runs in the compose stage and "
                          "follows compose's mode; set mode in [compose]")
    if cfg.run.method not in ("tcia", "evol"):
        raise ConfigError(f"{name('run.method')} = {cfg.run.method!r}: must be \"tcia\" or \"evol\"")
    for stage in _LLM_STAGES:
        t = cfg.temperature_of(stage)
        if t is not None:
            check_number(t, name(f"{stage}.temperature"), low=0, strict=False)
            if t > 2:
                raise ConfigError(f"{name(stage + '.temperature')} = {t!r}: must be at most 2")
        if not cfg.model_of(stage).strip():
            raise ConfigError(f"{name(stage + '.model')}: an empty model name")
    if not cfg.respond.generators or not all(isinstance(g, str) and g.strip() for g in cfg.respond.generators):
        raise ConfigError(f"{name('respond.generators')}: needs at least one model name")
    if cfg.respond.max_tokens is not None:
        check_number(cfg.respond.max_tokens, name("respond.max_tokens"), low=1, strict=False, whole=True)
    return cfg


def load_run_config(source: Source = None, overrides: Mapping[str, Any] | None = None,
                    origins: Mapping[str, str] | None = None) -> RunConfig:
    """The run's settings: the stage tables of an optional settings file (a SettingsFile or a path; every key
    checked), then `overrides` ("run.seed": 3, ...; None = not given), validated. The `[engine]` and `[batch]`
    tables are left to their own loaders."""
    cfg, where = _load_table(RunConfig, source, None, overrides, origins, check=validate_run)
    return validate_run(cfg, where)
