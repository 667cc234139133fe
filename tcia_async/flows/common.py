"""What every command shares: path checks before anything is written, results written through a temporary
file, the event loop, Ctrl-C handling, and unwrapping the exception a task group stands for."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from tcia_async.engine.errors import primary

__all__ = ["Interrupts", "Staged", "UsageError", "batch_settings", "by_kind", "cache_files", "check_out_dir",
           "check_paths", "check_replaceable", "engine_config", "exit_for", "is_results_file", "json_with",
           "missing_key", "primary", "run_async", "say", "starts_with"]


class UsageError(Exception):
    """A problem with the command's arguments, inputs or paths (exit 2). The message names the file or flag."""


def say(prog: str, msg: str) -> None:
    print(f"tcia-async {prog}: {msg}", file=sys.stderr, flush=True)


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def cache_files(cache: str | os.PathLike[str]) -> list[str]:
    """The files a cache at `cache` owns (SQLite's WAL and shared memory, our lock)."""
    c = os.fspath(cache)
    return [c, c + "-wal", c + "-shm", c + ".lock"]


def check_out_dir(out: Path, flag: str, markers: tuple[str, ...], what: str,
                  ours: Callable[[Path], bool] = Path.exists) -> None:
    """Refuse an --out folder that exists, is not empty and holds none of `markers` (the files an earlier run of
    this command leaves, each recognised by `ours`): its files are someone else's, and this command would replace
    some of them."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    if any(ours(out / m) for m in markers):
        return
    names = sorted(p.name for p in out.iterdir())
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise UsageError(f"{flag} {out}: a folder with files of its own ({shown}), not {what}; its files would be "
                         "replaced: choose a new or empty folder")


def check_replaceable(path: str | os.PathLike[str] | None, role: str, ours: Callable[[Path], bool],
                      what: str) -> None:
    """Refuse (UsageError) an existing, non-empty file at `path` that `ours` does not recognise as an earlier
    output of this command: it is someone else's file, and writing would replace it."""
    if path is None:
        return
    p = Path(path)
    if p.is_file() and p.stat().st_size > 0 and not ours(p):
        raise UsageError(f"{path}: exists and is not {what} ({role}); writing would replace it: choose another "
                         "path, or move the file away")


def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """A check that a file begins with `prefix` (an output of ours told by its start; an unreadable one is not)."""
    def ours(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(len(prefix)) == prefix
        except OSError:
            return False
    return ours


# A Batch-format results line as generate writes it, told by its start: one line of embeddings can be larger
# than anything worth reading.
is_results_file = starts_with(b'{"id":"batch_req_')


def json_with(*keys: str) -> Callable[[Path], bool]:
    """A check that a file is a JSON object holding `keys` (how an output of ours is told from a namesake)."""
    def ours(path: Path) -> bool:
        import orjson

        try:
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)
    return ours


def check_paths(reads: Mapping[str, str | os.PathLike[str] | None],
                writes: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """Refuse (UsageError) any two roles that name one file, through symlinks, `./` or `..` spellings: an output
    that is an input, or two outputs on one file. Also refuse outputs that are directories or whose directory
    cannot be written, and inputs that cannot be read. Nothing is opened for writing here.

    `reads` / `writes` map a role ("input", "--output", "--cache") to a path (None: not used).
    """
    seen: dict[str, str] = {}
    for role, path in [*reads.items(), *writes.items()]:
        if path is None:
            continue
        real = _real(path)
        if real in seen:
            raise UsageError(f"{role} and {seen[real]} are the same file ({path}); nothing was written")
        seen[real] = role
    for role, path in reads.items():
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{path}: no such file ({role})")
        if p.is_dir():
            raise UsageError(f"{path}: is a directory, not a file ({role})")
        if not os.access(p, os.R_OK):
            raise UsageError(f"{path}: cannot be read (permission denied) ({role})")
    for role, path in writes.items():
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise UsageError(f"{path}: is a directory ({role} names a file)")
        parent = p.parent if str(p.parent) else Path(".")
        existing = next((a for a in [parent, *parent.parents] if a.exists()), Path("."))
        if not existing.is_dir():
            raise UsageError(f"{path}: cannot be created: {existing} is not a directory ({role})")
        if not os.access(existing, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise UsageError(f"{path}: cannot be written (permission denied) ({role})")


class Staged:
    """A file written under a temporary name beside its final one and renamed into place by `commit()`: a run
    that fails, is refused or is interrupted never damages what was there before."""

    def __init__(self, final: str | os.PathLike[str], suffix: str = ".partial") -> None:
        self.final = Path(final)
        self.temp = self.final.with_name(self.final.name + suffix)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.temp, "wb", buffering=1 << 16)

    def commit(self) -> None:
        self.fh.close()
        os.replace(self.temp, self.final)

    def close(self) -> None:
        """Stop writing and leave the temporary file as it is (the partial results of a stopped run)."""
        if not self.fh.closed:
            self.fh.close()


def engine_config(args: Any, settings: Any, flags: Mapping[str, str], **given: Any) -> Any:
    """The EngineConfig of a command: its flags (`flags` maps a setting to its flag, e.g. "limits.rpm": "--rpm")
    and `given` (settings the command fixes), then the `[engine]` table of its settings file (`settings`, from
    `read_settings(args.config)`), then $OPENAI_BASE_URL, then the defaults; checked together, an error naming
    where a bad value came from (ConfigError)."""
    from tcia_async.config import load_engine_config

    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in flags.items()}
    env = {"base_url": (os.environ.get("OPENAI_BASE_URL") or None, "$OPENAI_BASE_URL")}
    return load_engine_config(settings, {**overrides, **given}, flags, env)


def batch_settings(args: Any, settings: Any) -> Any:
    """The BatchSettings of a command with --mode batch: --poll-interval, then the `[batch]` table of its settings
    file (`settings`, from `read_settings`), then the defaults (ConfigError when wrong)."""
    from tcia_async.config import load_batch_settings

    return load_batch_settings(settings, {"poll_interval": args.poll_interval}, {"poll_interval": "--poll-interval"})


def missing_key(cfg: Any) -> str | None:
    """What to say when the provider needs an API key and none is set (loopback servers need none), else None."""
    from tcia_async.engine.client import is_loopback

    if cfg.api_key() or is_loopback(cfg.base_url):
        return None
    return f"no API key: set ${cfg.api_key_env} (or name another variable with --api-key-env)"


def run_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on a fresh event loop (uvloop where installed)."""
    from tcia_async.engine.tuning import event_loop_options

    return anyio.run(fn, *args, backend="asyncio", backend_options=event_loop_options())


def exit_for(exc: BaseException, usage: tuple[type[BaseException], ...], err: Callable[[str], None]) -> int:
    """The exit code of a failure a user can reach, its one-line message said through `err`: a usage error of
    the command (`usage`, the cache's and path problems) or an OS error on a file is exit 2. Anything else is a
    bug: raised again, with its traceback."""
    from tcia_async.engine.cache import CacheError

    e = primary(exc)
    if isinstance(e, (CacheError, UsageError, *usage)):
        err(str(e))
        return 2
    if isinstance(e, OSError):
        err(f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": "))
        return 2
    raise exc


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM: the first calls `first()` (stop starting work, let requests on the wire
    finish), a second calls `second()` (stop at once). Run `watch` in a task group."""

    def __init__(self, first: Callable[[], None], second: Callable[[], None]) -> None:
        self.first = first
        self.second = second
        self.count = 0

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    async def watch(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.count += 1
                (self.first if self.count == 1 else self.second)()


def by_kind(counts: Mapping[str, int]) -> str:
    """`400 bad_request 3, timeout 1` from {code: count}, most frequent first."""
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
