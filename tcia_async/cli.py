"""Command-line interface: argument parsing only. Each subcommand hands its arguments to one flow.

Exit codes (flows/__init__.py): 0 done, 2 usage, configuration or path error, 3 stopped early on quota, auth or
a failing provider (state kept; rerun the same command to continue), 4 done but some items ended in an error,
130 interrupted (Ctrl-C; rerun to continue).

Only the chosen subcommand's module is imported (its flags live beside its flow), so `tcia-async generate`
does not pay for importing the simulator or the task database at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

from tcia_async import __version__
from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


class _Command(NamedTuple):
    help: str
    description: str
    module: str  # defines add_arguments(parser)
    handler: str | None  # the module's function to run; None when its sub-actions set their own `handler`


COMMANDS: dict[str, _Command] = {
    "demo": _Command(
        "run the TCIA pipeline end to end against a local simulator (no API key, no network)",
        "Start the OpenAI-compatible simulator on loopback and run `tcia-async run` on the shipped seeds, "
        "contexts and task database: interrupted with a Ctrl-C part way, resumed, and replayed, to show that a "
        "resumed run pays nothing twice; then print the report's headline figures.",
        "tcia_async.flows.demo",
        "run",
    ),
    "generate": _Command(
        "send an OpenAI Batch-format JSONL file of requests, write one result per custom_id",
        "Bulk requests to any OpenAI-compatible API as fast as its rate limits allow. Input and output are the "
        "OpenAI Batch formats. Answers are cached by content: rerunning the same command after a crash or Ctrl-C "
        "sends only what was never answered.",
        "tcia_async.flows.generate",
        "run_cli",
    ),
    "run": _Command(
        "generate on-task instructions with judged answers from seed instructions (the TCIA pipeline)",
        "From seed instructions to validated, on-task instructions with judged answers: decompose each seed, "
        "retrieve constraints of similar tasks from the task database, search constraint sets breadth-first, "
        "compose and verify instructions, validate them, check they stay on task, pair them with contexts, "
        "answer them with several generator models, judge every answer and keep the best (SFT) and best/worst "
        "pairs (DPO). Every call is cached: rerun the same command to resume.",
        "tcia_async.flows.run",
        "run_cli",
    ),
    "batches": _Command(
        "list the Batch API batches recorded in a state directory; --cancel cancels those in flight",
        "The batches that `generate --mode batch` (and the other batch modes) recorded in a state directory, with "
        "their status and request counts at the provider. The directory is only read.",
        "tcia_async.flows.batches",
        "run_cli",
    ),
    "compare": _Command(
        "compare several runs side by side (e.g. TCIA against the Evol-Instruct baseline)",
        "A side-by-side table and plots of runs of `tcia-async run`: diversity and on-task ratio per hop, kept "
        "share, judge means and cost per 1,000 SFT examples, with the paper's figures for reference. Diversity is "
        "compared only between runs embedded with the same model.",
        "tcia_async.flows.compare",
        "run_cli",
    ),
    "db": _Command(
        "build and query the task database (decomposed instructions, task-type clusters, HNSW indexes)",
        "The task database that TCIA retrieves constraints from.",
        "tcia_async.flows.taskdb",
        None,
    ),
    "sim": _Command(
        "run the OpenAI-compatible simulator on 127.0.0.1 (tests, benchmarks, offline demo)",
        "An OpenAI-compatible server on loopback with a latency model, rate limits, fault injection and a ledger "
        "of every request (GET /sim/stats). Every answer it gives is simulated.",
        "tcia_async.sim.cli",
        "run",
    ),
}


def start_simulator(**settings):
    """A simulator in a background thread (a context manager with `.base_url`), zero latency unless told.

    Flows may not import the simulator; the commands that need one (`demo`, `db query` on a database built with
    it) receive this function as `args.start_simulator`.
    """
    from tcia_async.sim import SimConfig, SimThread

    settings.setdefault("latency_ms", 0)
    return SimThread(SimConfig(**settings))


def _chosen(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in `argv` gets its flags (and its module imported)."""
    parser = argparse.ArgumentParser(
        prog="tcia-async",
        description="Generate on-task instruction-tuning data with TCIA against OpenAI-compatible APIs, at the "
        "speed of the provider's rate limit, resumable without paying twice. Run `tcia-async COMMAND --help` for "
        "a command's flags.",
        epilog="exit codes: 0 done; 2 usage, configuration or path error (nothing written); 3 stopped: quota, auth or "
        "a provider failing on everything (rerun to continue); 4 done, but some items ended in an error; "
        "130 interrupted (rerun to continue).",
    )
    parser.add_argument("--version", action="version", version=f"tcia-async {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        if name == chosen:
            p.set_defaults(start_simulator=start_simulator)
            if cmd.handler:
                p.set_defaults(handler=f"{cmd.module}:{cmd.handler}")
            importlib.import_module(cmd.module).add_arguments(p)
    return parser


def _resolve(handler: str):
    module, _, func = handler.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # a Ctrl-C before a command's own handling starts (imports) or after it ends
        print("tcia-async: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output left (`| head`): nothing more to say. Python would report the pipe again
        # when it flushes stdout at exit; point stdout at /dev/null so it does not.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        # A command with sub-actions (db) given none, or no command at all.
        target = parser
        if args.command:
            target = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
                args.command
            ]
        target.print_help(sys.stderr)
        return EXIT_USAGE
    return int(_resolve(handler)(args) or 0)
