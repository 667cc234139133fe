"""`tcia-async demo`: the TCIA pipeline end to end against a local simulator, no API key and no network.

What it shows, in order: `tcia-async run` on the shipped seeds, contexts and task database, interrupted with a
Ctrl-C part way (as a user would); the rerun that completes it, sending only what was never answered; a third run
that replays everything from the cache; the simulator's ledger (requests it answered twice: paid twice); and the
headline figures of the report.

The simulator is started by the CLI layer (flows do not import it) and handed over as `args.start_simulator`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from tcia_async.flows import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from tcia_async.flows.common import UsageError, check_out_dir, say, starts_with

# Example prices (USD per 1M tokens; OpenAI's list prices for these models in 2025), so the report shows a cost.
DEMO_SETTINGS = """# Settings of the demo run: small, so it finishes within a minute on two cores.
[run]
model = "gpt-4.1-mini"
[explore]
sample = {sample}          # constraint sets per seed (the paper: 2000)
[contexts]
per_instruction = 2
[respond]
generators = ["gpt-4.1-mini", "gpt-4.1-nano"]
[judge]
model = "gpt-4.1"
[engine]
concurrency = {concurrency}
[engine.limits]
rpm = {rpm}
[engine.prices."gpt-4.1"]
input = 2.0
output = 8.0
cached_input = 0.5
[engine.prices."gpt-4.1-mini"]
input = 0.4
output = 1.6
cached_input = 0.1
[engine.prices."gpt-4.1-nano"]
input = 0.1
output = 0.4
cached_input = 0.025
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-run", help="directory for the demo's files (default ./demo-run)")
    p.add_argument("--sets", type=int, default=40, metavar="N",
                   help="constraint sets sampled per seed (default 40; the paper used 2000)")
    p.add_argument("--rpm", type=int, default=30000,
                   help="the simulated provider's requests-per-minute limit (default 30000)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="simulated latency per request (default 50)")
    p.add_argument("--concurrency", type=int, default=64, help="requests on the wire (default 64)")
    p.add_argument("--quiet", action="store_true", help="the demo's own step lines and its summary only, not the runs' progress")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data(name: str) -> Path:
    return Path(str(resources.files("tcia_async") / "data" / name))


def _run_argv(out: Path, base_url: str, config: Path, quiet: bool) -> list[str]:
    argv = [sys.executable, "-m", "tcia_async", "run", str(_data("seeds.jsonl")), "--contexts",
            str(_data("contexts.jsonl")), "--out", str(out), "--base-url", base_url, "--config", str(config)]
    return argv + (["--quiet"] if quiet else [])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPENAI_BASE_URL", None)  # the demo talks to its own simulator only
    return env


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        check_out_dir(out, "--out", ("demo.toml",), "the folder of an earlier demo",
                      ours=starts_with(DEMO_SETTINGS.splitlines(keepends=True)[0].encode()))
    except UsageError as exc:
        say("demo", str(exc))
        return EXIT_USAGE
    for name, value in (("--sets", args.sets), ("--rpm", args.rpm), ("--concurrency", args.concurrency)):
        if value < 1:
            say("demo", f"{name} must be at least 1")
            return EXIT_USAGE
    if not args.latency_ms >= 0:
        say("demo", "--latency-ms must be a number >= 0")
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    if run_dir.is_dir():  # an earlier demo's (checked above): the run starts from nothing, so its figures mean something
        _say(f"demo: removing the earlier demo's run in {run_dir}")
        shutil.rmtree(run_dir)
    config = out / "demo.toml"
    config.write_text(DEMO_SETTINGS.format(sample=args.sets, concurrency=args.concurrency, rpm=args.rpm))

    with args.start_simulator(latency_ms=args.latency_ms, jitter_ms=args.latency_ms / 4, rpm=args.rpm) as sim:
        _say(f"demo: simulated provider at {sim.base_url} (latency {args.latency_ms:.0f} ms, RPM {args.rpm}); "
             f"settings in {config}")

        # 1. A run interrupted part way: a Ctrl-C (SIGINT) after about a third of its requests (each set makes
        # about a dozen: compose, verify, validate, on-task, then answers and judgements for each context).
        interrupt_at = max(20, 4 * 3 * args.sets)
        _say("demo: run 1 — `tcia-async run` on the shipped seeds, interrupted with a Ctrl-C part way")
        argv = _run_argv(run_dir, sim.base_url, config, quiet=True)
        proc = subprocess.Popen(argv, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            sim.wait_requests(interrupt_at, timeout=120)
        except TimeoutError:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        paid_before = sim.stats()["ok"]
        _say(f"demo: run 1 ended with exit code {proc.returncode} after {paid_before} answered requests"
             + (" (interrupted: answers cached)" if proc.returncode == EXIT_INTERRUPTED else ""))
        if proc.returncode not in (EXIT_OK, EXIT_INTERRUPTED):
            _say(err[-2000:])
            return proc.returncode

        # 2. The same command again: what run 1 answered comes from the cache, only the rest is sent.
        _say("demo: run 2 — the same command again: it resumes")
        t0 = time.perf_counter()
        p2 = subprocess.run(_run_argv(run_dir, sim.base_url, config, args.quiet), env=_child_env(),
                            stderr=None if not args.quiet else subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        t_run2 = time.perf_counter() - t0
        if p2.returncode != EXIT_OK:
            _say(f"demo: run 2 exited {p2.returncode}" + (f": {p2.stderr[-2000:]}" if p2.stderr else ""))
            return p2.returncode
        after_run2 = sim.stats()
        resumed = orjson.loads((run_dir / "report.json").read_bytes())  # run 3 rewrites it as a replay

        # 3. Once more: everything is cached, nothing is paid.
        _say("demo: run 3 — once more: a pure replay")
        p3 = subprocess.run(_run_argv(run_dir, sim.base_url, config, True), env=_child_env(),
                            capture_output=True, text=True)
        stats = sim.stats()
        if p3.returncode != EXIT_OK:
            _say(f"demo: run 3 exited {p3.returncode}: {p3.stderr[-2000:]}")
            return p3.returncode

    report = orjson.loads((run_dir / "report.json").read_bytes())
    _print_summary(report, resumed, run_dir, paid_before, after_run2, stats, t_run2)
    return EXIT_OK


def _print_summary(r: dict[str, Any], resumed: dict[str, Any], run_dir: Path, paid_before: int,
                   after_run2: dict[str, Any], stats: dict[str, Any], t_run2: float) -> None:
    f = r["funnel"]
    co = r["cost"]
    c2 = resumed["cost"]
    hops = "\n".join(_hop_line(h) for h in r["per_hop"])
    retrieval = "\n".join(f"    {x['seed_id']}: task type {x['task_type']!r} -> cluster {x['cluster_name']!r} "
                          f"(distance {x['distance']:.3f}, {x['pool']} constraints in its pool)"
                          for x in r["retrieval"])
    print(f"""
demo results (simulated provider: every answer is rule-made, the figures show the machinery)
  retrieval:
{retrieval}
  per hop:
{hops}
  kept {f['kept']} of {f['composed']} instructions; {f['sft_examples']} SFT examples, {f['preference_pairs']} preference pairs
  cost of the data at example prices ${co['usd']:.4f}, ${co['per_1000_sft_examples_usd'] or 0:.4f} per 1,000 SFT examples
  run 2 paid ${c2['paid_by_this_run_usd']:.4f} for what run 1 had not (${c2['usd_at_full_price']:.4f} at full input price: \
{c2['cached_prompt_tokens']:,} of {c2['prompt_tokens']:,} prompt tokens came from the provider's prompt cache)
  resume: run 1 was interrupted after {paid_before} answers; run 2 sent {after_run2['requests'] - paid_before} more \
in {t_run2:.1f} s; run 3 sent {stats['requests'] - after_run2['requests']}
  simulator ledger: {stats['ok']} paid answers for {stats['unique']} distinct requests, {stats['duplicates']} paid twice
  files: {run_dir}/sft.jsonl, preferences.jsonl, instructions.jsonl, report.md (with plots)""", flush=True)


def _hop_line(h: dict[str, Any]) -> str:
    div = "–" if h["diversity"] is None else f"{h['diversity']:.3f}"
    on = "–" if h["on_task_ratio"] is None else f"{100 * h['on_task_ratio']:.0f} %"
    return (f"    hop {h['hop']}: {h['sampled']:>4} sets sampled, {h['composed']:>4} composed, {h['kept']:>4} kept; "
            f"diversity {div}, on task {on}")
