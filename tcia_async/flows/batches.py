"""`tcia-async batches DIR`: the batches a Batch API state directory records (engine/batch.py), with their status
at the provider; `--cancel` cancels those still in flight.

The directory is only read: a run may be using it at the same time. Each batch is asked about at the base URL
it was created at (recorded with it; `--base-url` overrides), with the key from $OPENAI_API_KEY (or
`--api-key-env`). Batches already settled by a run show what was recorded then, without a request.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from tcia_async.flows.common import exit_for, primary, run_async, say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("exit codes: 0 listed (and cancelled); 2 not a batch state directory, or a usage error; 3 the "
                "provider refused or could not be reached; 130 interrupted.")
    p.add_argument("dir", metavar="DIR", help="a batch state directory (generate --mode batch: RESULTS.batches; run: "
                   "RUNDIR/batches/STAGE; db build: DBDIR/batches)")
    p.add_argument("--cancel", action="store_true", help="cancel the batches still in flight (a rerun of the "
                   "command that made them resubmits their unanswered lines)")
    p.add_argument("--base-url", help="ask this base URL instead of the one each batch was created at")
    p.add_argument("--api-key-env", metavar="VAR", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds per request (default 60)")


def _err(msg: str) -> None:
    say("batches", msg)


def progress_printer(say_line: Callable[[str], None]) -> Callable[[Any], None]:
    """An `on_progress` for run_batches that says one line per batch whenever its status or counts change."""
    shown: dict[str, tuple] = {}

    def show(p: Any) -> None:
        now = (p.status, p.completed, p.failed)
        if shown.get(p.name) == now:
            return
        shown[p.name] = now
        again = f", resubmission {p.round}" if p.round else ""
        say_line(f"batch {p.name} {p.batch_id} ({p.model}{again}): {p.status}, {p.completed}/{p.total} done, "
                 f"{p.failed} failed, {p.elapsed:,.0f} s")

    return show


def _when(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or epoch <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _row(rec: Any, obj: dict[str, Any] | None, note: str = "") -> list[str]:
    counts = (obj or {}).get("request_counts") or rec.counts or {}
    status = (obj or {}).get("status") or rec.status or "uploaded"
    if rec.settled:
        status += " (settled)"
    done = f"{counts.get('completed', 0)}/{counts.get('total', rec.lines) or rec.lines}"
    return [rec.name, rec.batch_id or "-", status + note, done, str(counts.get("failed", 0)), rec.model,
            str(rec.round), _when((obj or {}).get("created_at") or rec.uploaded_at)]


async def _main(args: argparse.Namespace, records: list[Any]) -> tuple[list[list[str]], int]:
    from tcia_async.config import EngineConfig
    from tcia_async.engine.batch import TERMINAL, BatchAPI, BatchRefused
    from tcia_async.engine.client import Transport

    cfg = EngineConfig(max_attempts=3, timeout=args.timeout)
    key = os.environ.get(args.api_key_env)
    apis: dict[str, BatchAPI] = {}
    rows: list[list[str]] = []
    cancelled = 0
    try:
        for rec in records:
            if rec.settled or rec.batch_id is None:
                rows.append(_row(rec, None))
                continue
            base = args.base_url or rec.base_url
            api = apis.get(base)
            if api is None:
                transport = Transport(base, key, 4, args.timeout)
                await transport.open()
                api = apis[base] = BatchAPI(transport, cfg)
            note = ""
            try:
                obj = await api.batch(rec.batch_id)
                if args.cancel and obj.get("status") not in TERMINAL:
                    obj = await api.cancel(rec.batch_id)
                    cancelled += 1
                    note = " (cancel asked)"
            except BatchRefused as exc:
                obj, note = None, f" (provider: {exc})"
            rows.append(_row(rec, obj, note))
    finally:
        for api in apis.values():
            await api.transport.close()
    return rows, cancelled


def _not_a_state_dir(path: Any, state_file: str) -> str | None:
    """Why `path` is not a batch state directory (None: it is), pointing to the state directories below it: a run
    keeps one a stage (RUNDIR/batches/STAGE)."""
    if not path.exists():
        return f"{path}: does not exist"
    if not path.is_dir():
        return f"{path}: not a directory (give a batch state directory)"
    if (path / state_file).is_file():
        return None
    below = sorted({p.parent for pattern in (f"*/{state_file}", f"*/*/{state_file}") for p in path.glob(pattern)})
    if not below:
        return f"{path}: not a batch state directory (no {state_file})"
    shown = ", ".join(str(p) for p in below[:8]) + (", ..." if len(below) > 8 else "")
    return (f"{path}: not a batch state directory (no {state_file}), but these are: {shown}; "
            f"give one, e.g. `tcia-async batches {below[0]}`")


def run_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tcia_async.engine import RunStopped
    from tcia_async.engine.batch import STATE_FILE, read_state

    if (why := _not_a_state_dir(Path(args.dir), STATE_FILE)) is not None:
        _err(why)
        return EXIT_USAGE
    try:
        records = read_state(args.dir)  # an unreadable state file is an OSError naming it: exit 2
        rows, cancelled = run_async(_main, args, records)
    except KeyboardInterrupt:
        _err("interrupted" + ("; the batches asked about so far may be cancelled: rerun to see" if args.cancel
                              else ""))
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - what a user can reach becomes one line
        if isinstance(primary(exc), RunStopped):
            _err(str(primary(exc)))
            return EXIT_STOPPED
        return exit_for(exc, (), _err)
    head = ["name", "batch", "status", "done", "failed", "model", "round", "created (UTC)"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    live = sum(1 for r in records if r.live and r.batch_id is not None)
    print(f"{len(records)} batch files, {live} not settled"
          + (f"; cancel asked for {cancelled}" if args.cancel else ""))
    return EXIT_OK
