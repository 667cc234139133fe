"""Command-line interface: argument parsing only. Each subcommand hands its arguments to one flow.

Exit codes: 0 done, 1 internal error, 2 usage or configuration error, 3 stopped early on quota/auth (state kept;
rerun the same command to continue), 130 interrupted (Ctrl-C; rerun to continue).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tcia_async import __version__

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130


def _add_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="run the OpenAI-compatible simulator on 127.0.0.1 (tests, benchmarks, offline demo)",
        description="An OpenAI-compatible server on loopback with a latency model, rate limits, fault injection "
        "and a ledger of every request (GET /sim/stats). Every answer it gives is simulated.",
    )
    p.set_defaults(handler="tcia_async.sim.cli:run")
    # The simulator owns its own flags (it imports nothing of ours); see tcia_async/sim/cli.py.
    from tcia_async.sim.cli import add_arguments

    add_arguments(p)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="send an OpenAI Batch-format JSONL file of requests, write one result per custom_id",
        description="Bulk requests to any OpenAI-compatible API as fast as its rate limits allow. Input and output "
        "are the OpenAI Batch formats. Answers are cached by content: rerunning the same command after a crash or "
        "Ctrl-C sends only what was never answered.",
    )
    p.set_defaults(handler="tcia_async.flows.generate:run_cli")
    from tcia_async.flows.generate import add_arguments

    add_arguments(p)


def _add_db(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "db",
        help="build and query the task database (decomposed instructions, task-type clusters, HNSW indexes)",
        description="The task database that TCIA retrieves constraints from.",
    )
    from tcia_async.flows.taskdb import add_arguments

    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcia-async",
        description="Generate on-task instruction-tuning data with TCIA against OpenAI-compatible APIs, at the "
        "speed of the provider's rate limit, resumable without paying twice.",
    )
    parser.add_argument("--version", action="version", version=f"tcia-async {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_sim(sub)
    _add_generate(sub)
    _add_db(sub)
    return parser


def _resolve(handler: str):
    import importlib

    module, _, func = handler.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(_resolve(handler)(args) or 0)
