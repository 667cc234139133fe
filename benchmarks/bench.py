"""The benchmark harness behind `./bench.sh`: runs the scenarios against the simulator (a separate process) and
writes `summary.json`, `report.md` and PNG plots to the results directory.

    python benchmarks/bench.py [--quick | --full | --tiny] [--only throughput,resume,...] [--out DIR] [--keep]

`--quick` (the default) fits in a few minutes on 2 cores; `--full` is the size the issues name; `--tiny` only
checks the plumbing (the test suite uses it). A missed target is reported, never an error: this is a
measurement. A scenario whose dependency is missing records a skip with the reason; one that crashes records
the error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report  # noqa: E402
from common import HERE, PY, ROOT, child_env, machine, project_sim_available  # noqa: E402

SCENARIOS = ["throughput", "latency_bound", "rate_limited", "resume", "memory", "hnsw", "pipeline", "retrieval"]

PROFILES: dict[str, dict[str, dict]] = {
    "tiny": {
        "throughput": {"n": 300, "c": 64, "rounds": 1, "sdk_n": 200},
        "latency_bound": {"n": 256, "c": 128, "latency_ms": 100, "sdk": False},
        "rate_limited": {"n": 160, "c": 64, "latency_ms": 20, "rps": 80, "sdk": True},
        "resume": {"n": 600, "c": 32, "latency_ms": 50, "poll_ms": 5},
        "memory": {"n": 2000, "n_small": 500, "c": 64},
        "hnsw": {"n": 2000, "queries": 200, "dbscan_n": 500},
        "pipeline": {"sample": 4, "c": 16, "latency_ms": 20, "engine_n": 200},
        "retrieval": {"stride": 4},
    },
    "quick": {
        "throughput": {"n": 5000, "c": 256, "rounds": 3, "sdk_n": 5000},
        "latency_bound": {"n": 8192, "c": 1024, "latency_ms": 500, "sdk": True, "sdk_n": 2048},
        "rate_limited": {"n": 1500, "c": 256, "latency_ms": 200, "rps": 100, "sdk": True},
        "resume": {"n": 5000, "c": 256, "latency_ms": 200, "poll_ms": 20},
        "memory": {"n": 100_000, "n_small": 10_000, "c": 256},
        "hnsw": {"n": 20_000},
        "pipeline": {"sample": 150, "c": 64, "latency_ms": 100, "engine_n": 4000},
        "retrieval": {"stride": 1},
    },
    "full": {
        "throughput": {"n": 20_000, "c": 256, "rounds": 3, "sdk_n": 20_000},
        "latency_bound": {"n": 20_480, "c": 1024, "latency_ms": 500, "sdk": True, "sdk_n": 4096},
        "rate_limited": {"n": 12_000, "c": 256, "latency_ms": 200, "rpm": 6000, "tpm": 1_000_000, "sdk": True},
        "resume": {"n": 20_000, "c": 256, "latency_ms": 200, "poll_ms": 20},
        "memory": {"n": 1_000_000, "n_small": 100_000, "c": 256},
        "hnsw": {"n": 100_000},
        "pipeline": {"seeds": 12, "sample": 2000, "c": 128, "latency_ms": 100, "engine_n": 20_000},
        "retrieval": {"stride": 1},
    },
}


class Context:
    """What a scenario needs: its sizes, a scratch directory, a log file per name, progress output."""

    def __init__(self, profile: str, work: Path, logs: Path, timeout: float) -> None:
        self.profile = profile
        self.work = work
        self.logs = logs
        self.timeout = timeout

    def params(self, scenario: str) -> dict:
        return PROFILES[self.profile][scenario]

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def run_hnsw(ctx: Context) -> dict:
    """The retrieval engineer's benchmarks/hnsw.py `run(n)`, in a process of its own."""
    kwargs = dict(ctx.params("hnsw"))
    n = kwargs.pop("n")
    if not (HERE / "hnsw.py").exists():
        return {"n": n, "recall_at_10": None, "qps": None, "build_s": None,
                "skipped": "benchmarks/hnsw.py is not there yet"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import hnsw; "
            "print(json.dumps(hnsw.run(int(sys.argv[2]), **json.loads(sys.argv[3]))))")
    with open(ctx.log("hnsw"), "ab") as log:
        proc = subprocess.run([PY, "-c", code, str(HERE), str(n), json.dumps(kwargs)], stdout=subprocess.PIPE, stderr=log,
                              env=child_env(), cwd=ROOT, timeout=ctx.timeout)
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"n": n, "recall_at_10": None, "qps": None, "build_s": None,
                "error": f"benchmarks/hnsw.py exited {proc.returncode}; see {ctx.log('hnsw')}"}
    res = json.loads(lines[-1])
    res.setdefault("n", n)
    db = res.get("dbscan") or {}
    res["dbscan_adjusted_rand"] = db.get("adjusted_rand")
    res["dbscan_speedup"] = db.get("speedup")
    for key in ("recall_at_10", "qps", "build_s"):
        res.setdefault(key, None)
    return res


def run_scenario(name: str, ctx: Context) -> dict:
    if name == "hnsw":
        return run_hnsw(ctx)
    module = __import__(name)
    return module.run(ctx)


def raise_fd_limit() -> None:
    """C = 1024 connections on each side needs more descriptors than some systems' soft default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def exit_on_signals() -> None:
    """SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt in the main thread, so the `finally` blocks and
    `with` exits run: they end the simulator and client processes (each in a session of its own, which a signal
    to our process group does not reach) and remove the scratch directory. A second SIGTERM during that clean-up
    is ignored so it cannot cut the clean-up short."""

    def on_term(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a caller that ignores SIGINT keeps it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sh", description=__doc__.split("\n\n")[0].replace("\n", " "))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="a few minutes on 2 cores (default)")
    size.add_argument("--full", dest="profile", action="store_const", const="full", help="the sizes the issues name")
    size.add_argument("--tiny", dest="profile", action="store_const", const="tiny",
                      help="plumbing check in seconds (figures mean nothing)")
    p.add_argument("--only", help=f"comma-separated scenarios out of: {','.join(SCENARIOS)}")
    p.add_argument("--out", default=str(HERE / "results"), help="results directory (default benchmarks/results)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (inputs, results, caches)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds any one client process may run")
    args = p.parse_args(argv)
    profile = args.profile or "quick"
    names = SCENARIOS
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in names if s not in SCENARIOS]
        if unknown:
            p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")

    out_dir = Path(args.out)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    exit_on_signals()
    raise_fd_limit()
    started = time.time()
    summary: dict = {
        "profile": profile,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "command": "./bench.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "simulator": "tcia-async sim" if project_sim_available() else
        "benchmarks/devsim.py (stand-in: tcia_async.sim is not available)",
        "scenarios_run": names,
    }
    work = Path(tempfile.mkdtemp(prefix="tcia-bench-"))
    try:
        ctx = Context(profile, work, logs, args.timeout)
        ctx.say(f"bench: profile {profile}, scenarios {', '.join(names)}, scratch {work}")
        for name in names:
            ctx.say(f"[{name}]")
            t0 = time.perf_counter()
            try:
                res = run_scenario(name, ctx)
            except Exception as exc:  # one broken scenario must not cost the others their figures
                res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
                ctx.say(f"  error: {res['error']}")
            res["scenario_s"] = round(time.perf_counter() - t0, 2)
            if "skipped" in res:
                ctx.say(f"  skipped: {res['skipped']}")
            summary[name] = res
    finally:
        if args.keep:
            print(f"scratch kept at {work}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary["elapsed_s"] = round(time.time() - started, 1)
    bench_report.fill_missing(summary, names)
    summary["targets"] = bench_report.evaluate(summary)
    plots = bench_report.plots(summary, out_dir)
    summary["plots"] = plots
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(bench_report.markdown(summary))
    ctx.say(bench_report.table(summary))
    ctx.say(f"bench: done in {summary['elapsed_s']} s; wrote {out_dir / 'summary.json'} and {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
