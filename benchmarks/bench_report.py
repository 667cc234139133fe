"""Targets, report.md and plots for the benchmark summary.

Targets are the project's (README, "Benchmarks"; each row names the issue that set it); a figure that
misses its target is marked `short`, never an error.
"""

from __future__ import annotations

from pathlib import Path

# Keys every summary holds (None when a scenario was skipped, not selected, or failed).
REQUIRED = {
    "throughput": ["engine_rps", "floor_rps", "openai_sdk_rps", "ratio_floor", "ratio_sdk", "engine_cpu_us"],
    "latency_bound": ["efficiency"],
    "rate_limited": ["time_ratio", "share_429"],
    "resume": ["duplicates", "in_flight_at_kill", "replay_rps"],
    "memory": ["n", "peak_rss_mb"],
    "hnsw": ["recall_at_10", "qps", "build_s"],
    "pipeline": ["overlap_ratio"],
    "retrieval": ["local_top3", "hashed_top3"],
}

# (scenario, key, label, op, target or a function of the scenario's dict, source)
TARGETS = [
    ("throughput", "ratio_floor", "engine req/s ÷ raw aiohttp floor", ">=", 0.65, "issue 10"),
    ("throughput", "ratio_sdk", "engine req/s (best round) ÷ openai SDK (one round only)", ">=", 15.0, "issue 3"),
    ("throughput", "engine_rps", "engine req/s (zero latency)", None, None, ""),
    ("throughput", "ratio_floor_median_round", "median over rounds of engine ÷ floor (round by round)", None, None,
     ""),
    ("throughput", "engine_cpu_us", "engine CPU µs/request", None, None, ""),
    ("throughput", "engine_loop_cpu_us", "engine CPU µs/request on the event loop's thread", None, None, ""),
    ("throughput", "floor_rps", "raw aiohttp floor req/s", None, None, ""),
    ("throughput", "floor_cpu_us", "raw aiohttp floor CPU µs/request", None, None, ""),
    ("throughput", "openai_sdk_rps", "openai SDK req/s", None, None, ""),
    ("throughput", "openai_sdk_cpu_us", "openai SDK CPU µs/request", None, None, ""),
    ("latency_bound", "efficiency", "achieved ÷ (C / latency)", ">=", 0.95, "project target"),
    ("latency_bound", "floor_efficiency", "floor: achieved ÷ (C / latency)", None, None, ""),
    ("latency_bound", "efficiency_vs_floor", "engine's efficiency ÷ the floor's (same run)", None, None, ""),
    ("rate_limited", "completed_share", "share of requests completed", ">=", 1.0, "project target"),
    ("rate_limited", "time_ratio", "run time ÷ ideal time", "<=", 1.03, "issue 3"),
    ("rate_limited", "share_429", "share of requests answered 429", "<", 0.005, "issue 3"),
    ("rate_limited", "openai_sdk_completed_share", "openai SDK: share completed", None, None, ""),
    ("resume", "duplicates", "simulator duplicates after kill -9 + rerun", "<=", lambda s: s.get("concurrency"),
     "issue 3 (≤ concurrency)"),
    ("resume", "in_flight_at_kill", "requests in flight at the kill", None, None, ""),
    ("resume", "rerun_complete", "rerun: every custom_id exactly once", "==", True, "issue 3"),
    ("resume", "replay_rps", "replay from cache, answers/s", None, None, ""),
    ("memory", "peak_rss_mb", "peak RSS of generate (MB)", None, None, ""),
    ("memory", "growth", "peak RSS at N ÷ at N/10 (flat ≈ 1)", "<=", 1.25,
     "issue 3 \"memory flat\" (1.25 is our reading of flat)"),
    ("hnsw", "recall_at_10", "recall@10 vs exact", ">=", 0.97, "issue 4"),
    ("hnsw", "qps", "queries/s, one thread", ">=", 5000.0, "issue 4"),
    ("hnsw", "build_s", "index build, one thread (s)", "<=", 60.0, "issue 4 (at 100k)"),
    ("hnsw", "dbscan_adjusted_rand", "DBSCAN on HNSW vs exact: adjusted Rand", None, None, ""),
    ("hnsw", "dbscan_speedup", "DBSCAN on HNSW vs exact: speed-up", None, None, ""),
    ("pipeline", "overlap_ratio", "TCIA pipeline wall ÷ (its requests ÷ engine req/s)", "<=", 1.15, "issue 12"),
    ("pipeline", "pipeline_rps", "TCIA pipeline requests/s", None, None, ""),
    ("pipeline", "engine_rps", "engine req/s at the same latency and concurrency", None, None, ""),
    ("pipeline", "peak_rss_mb", "peak RSS of the run (MB)", "<", 300.0, "issue 12"),
    ("retrieval", "local_top3", "task descriptions whose top-3 clusters are of their kind (local)", ">=", 0.90,
     "issue 13"),
    ("retrieval", "hashed_top3", "the same, hashed n-gram fallback (the shipped DB re-embedded)", None, None, ""),
    ("retrieval", "hashed_built_top3", "the same, a DB built with hashed n-grams", None, None, ""),
]


def fill_missing(summary: dict, ran: list[str]) -> None:
    """Give every scenario its required keys (None when not measured) so readers can rely on them."""
    for scenario, keys in REQUIRED.items():
        res = summary.get(scenario)
        if res is None:
            res = summary[scenario] = {"skipped": "not selected (--only)"}
        for key in keys:
            res.setdefault(key, None)


def _check(value, op, target) -> str:
    if op is None:
        return "info"
    if value is None or target is None:
        return "not measured"
    ok = {">=": value >= target, "<=": value <= target, "<": value < target, "==": value == target}[op]
    return "pass" if ok else "short"


def evaluate(summary: dict) -> list[dict]:
    rows = []
    for scenario, key, label, op, spec, source in TARGETS:
        res = summary.get(scenario, {})
        target = spec(res) if callable(spec) else spec
        value = res.get(key)
        status = _check(value, op, target)
        why = None
        if value is None:
            why = res.get("skipped") or res.get("error") or res.get("engine_skipped")
            status = "not measured"
        shown = target if target is not None else "concurrency" if callable(spec) else None
        rows.append({"scenario": scenario, "key": key, "label": label, "value": value,
                     "target": None if op is None else f"{op} {shown}", "source": source, "status": status,
                     "reason": why})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(summary: dict) -> str:
    lines = ["| scenario | figure | value | target | status |", "|---|---|---|---|---|"]
    for r in summary["targets"]:
        lines.append(f"| {r['scenario']} | {r['label']} | {_fmt(r['value'])} | {r['target'] or ''} | {r['status']} |")
    return "\n".join(lines)


def _clients_table(res: dict, extra: list[tuple[str, str]] = ()) -> str:
    cols = [("req/s", "rps"), ("CPU µs/req", "cpu_us"), ("loop thread CPU µs/req", "loop_cpu_us"),
            ("sim CPU µs/req", "sim_cpu_us"), ("ok", "ok"),
            ("n", "n"), ("wall s", "wall_s")] + list(extra)
    lines = ["| client | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, c in res.get("clients", {}).items():
        if "skipped" in c or "error" in c:
            lines.append(f"| {name} | " + (c.get("skipped") or c.get("error")) + " |" + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {name} | " + " | ".join(_fmt(c.get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    m = summary["machine"]
    v = {k: x for k, x in m["versions"].items() if x}
    out = [
        "# tcia-async benchmark report",
        "",
        f"Profile `{summary['profile']}`, started {summary['started_at']}, {summary['elapsed_s']} s. "
        f"Command: `{summary['command']}`.",
        f"Machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu'] or 'unknown CPU'}, Python "
        f"{m['python']}, load average at start {m['load_average_at_start']}. Server: {summary['simulator']}, "
        "a separate process on loopback (client and server share the machine's cores).",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        "",
        "Each scenario runs its baselines in the same run against the same simulator process, so the ratios hold "
        "on a noisy machine; absolute figures move with the machine's load. Targets: the project's, "
        "each row naming the issue that set it (see the README's \"Benchmarks\"). A miss is reported as `short`; the "
        "script does not fail on it.",
        "",
        "## Figures against targets",
        "",
        table(summary),
        "",
    ]
    t = summary.get("throughput", {})
    if t.get("clients"):
        out += [f"## throughput — zero latency, N = {t['n']:,}, C = {t['concurrency']}", "",
                "Run window: first request to last result written and flushed; for the engine, to the engine "
                "closed, so its cache's last commit is inside it (interpreter start, imports and session set-up "
                "outside it). CPU: the client process's own. The engine runs with its SQLite cache (fresh), its "
                "limiter (limits far above the run's rate) and token counting on. All our clients, engine and "
                "floor, run with the same garbage-collector setting, the one `tcia-async generate` uses "
                "(engine/tuning.py: start-up objects frozen, young generation collected every 50,000 "
                "allocations); the openai SDK and the peers keep Python's defaults. Engine and floor: best of "
                f"{t['rounds']} interleaved rounds. The openai SDK and the peers run one round only, so the SDK "
                "ratio compares the engine's best round with the SDK's only round. All clients run on uvloop.", "",
                _clients_table(t), ""]
        cli = t.get("engine_cli", {})
        if cli.get("rps_end_to_end"):
            out += [f"`tcia-async generate` as a command, end to end (start-up included): "
                    f"{_fmt(cli['rps_end_to_end'])} req/s, {_fmt(cli['cpu_us_end_to_end'])} CPU µs/request.", ""]
        if "throughput.png" in summary.get("plots", {}).get("files", []):
            out += ["![throughput](throughput.png)", ""]
    lb = summary.get("latency_bound", {})
    if lb.get("clients"):
        out += [f"## latency_bound — latency {lb['latency_ms']} ms, C = {lb['concurrency']}, N = {lb['n']:,}", "",
                f"Ideal: C / latency = {_fmt(lb['ideal_rps'])} req/s. Efficiency = achieved ÷ ideal.", "",
                _clients_table(lb, [("efficiency", "efficiency")]), ""]
    rl = summary.get("rate_limited", {})
    if rl.get("clients"):
        lim = ", ".join(f"{k.upper()} {_fmt(x)}" for k, x in rl["limits"].items() if x)
        out += [f"## rate_limited — {lim}, latency {rl['latency_ms']} ms, C = {rl['concurrency']}, N = {rl['n']:,}",
                "",
                "The simulator's limits are rolling windows (1 s for RPS, 60 s for RPM/TPM) that start empty. Ideal = "
                "the finishing time of the best possible client: each request sent at the earliest moment when a "
                "concurrency slot is free (a request holds it for the latency) and every window has room (a "
                "request costs prompt tokens + max_tokens against TPM), so the first `limit` requests go at once; "
                "computed by replaying that schedule. "
                "`time_ratio` = run-window wall ÷ ideal; 429 share = 429 answers ÷ all requests the simulator "
                "received. The engine is configured with the same limits; the SDK uses its defaults "
                "(2 retries, honouring Retry-After).", "",
                _clients_table(rl, [("completed", "completed_share"), ("time ÷ ideal", "time_ratio"),
                                    ("time ÷ (N/rate)", "time_ratio_vs_n_over_rate"), ("429 share", "share_429")]),
                ""]
    rs = summary.get("resume", {})
    if rs.get("received_at_kill") is not None:
        out += [f"## resume — kill -9 at half way, rerun (N = {rs['n']:,}, C = {rs['concurrency']}, latency "
                f"{rs['latency_ms']} ms)", "",
                f"Command: {rs.get('command')}. The harness reads the simulator's ledger every "
                f"{_fmt(rs.get('poll_ms'))} ms and sends SIGKILL once it has received N/2 requests.", "",
                "Definitions: `received_at_kill` = requests the simulator had received when the client died; "
                "`answered_at_kill` = of those, the ones it answered successfully (billed), the rest were cut off "
                "by the kill; `saved_at_kill` = answers the client had made durable by then = N − requests the "
                "rerun sent (no faults are injected, so nothing is retried; `rerun_cached`, the command's own count, should "
                "agree); **`in_flight_at_kill` = "
                "received_at_kill − saved_at_kill**: the requests the provider had received whose answers the "
                "client had not made durable (on the wire, or received but not yet committed to the cache); the "
                "rerun sends all of them again. `duplicates` = the simulator's count of successful answers to "
                "content it had already answered (= answered_at_kill − saved_at_kill: the calls paid twice); "
                "`written_at_kill` = complete lines in RESULTS at the kill; `replay_rps` = answers per second of "
                "a third run with everything cached (engine Python API, run window).", "",
                "| figure | value |", "|---|---|"]
        for key in ("killed_after_s", "received_at_kill", "answered_at_kill", "written_at_kill", "saved_at_kill", "in_flight_at_kill",
                    "rerun_sent", "rerun_cached", "duplicates", "rerun_complete", "rerun_wall_s", "replay_rps", "replay_sent"):
            out.append(f"| {key} | {_fmt(rs.get(key))} |")
        out.append("")
    mem = summary.get("memory", {})
    if mem.get("runs"):
        out += [f"## memory — {mem.get('command')}, zero latency, cache and limiter on", "",
                "| N | peak RSS MB | req/s end to end | exit |", "|---|---|---|---|"]
        for r in mem["runs"]:
            out.append(f"| {r['n']:,} | {_fmt(r['peak_rss_mb'])} | {_fmt(r['rps_end_to_end'])} | {r['exit_code']} |")
        out.append("")
    skipped = []
    for k in REQUIRED:
        res = summary.get(k) or {}
        why = res.get("skipped") or res.get("error")
        if why:
            skipped.append((k, why))
        elif res.get("engine_skipped"):
            skipped.append((k, f"engine part: {res['engine_skipped']}"))
    if skipped:
        out += ["## Not measured in this run", ""] + [f"- `{k}`: {why}" for k, why in skipped] + [""]
    notes = summary.get("plots", {}).get("note")
    if notes:
        out += [f"Plots: {notes}", ""]
    for png in summary.get("plots", {}).get("files", []):
        if png != "throughput.png":
            out += [f"![{png}]({png})", ""]
    return "\n".join(out)


def plots(summary: dict, out_dir: Path) -> dict:
    """Write PNG plots next to the report; without matplotlib (the `bench` extra), say so and skip them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"files": [], "note": "matplotlib is not installed (pip install 'tcia-async[bench]'); no plots"}
    files = []
    t = summary.get("throughput", {})
    clients = {k: c for k, c in t.get("clients", {}).items() if c.get("rps")}
    if clients:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(clients)
        a.bar(names, [clients[k]["rps"] for k in names], color="#3b7dd8")
        a.set_title(f"requests/s (zero latency, N={t['n']:,}, C={t['concurrency']})")
        a.set_yscale("log")
        b.bar(names, [clients[k]["cpu_us"] for k in names], color="#d8763b")
        b.set_title("client CPU µs per request")
        b.set_yscale("log")
        for ax in (a, b):
            ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=100)
        plt.close(fig)
        files.append("throughput.png")
    lb, rl = summary.get("latency_bound", {}), summary.get("rate_limited", {})
    lbc = {k: c for k, c in lb.get("clients", {}).items() if c.get("efficiency")}
    rlc = {k: c for k, c in rl.get("clients", {}).items() if c.get("completed_share") is not None}
    if lbc or rlc:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        if lbc:
            a.bar(list(lbc), [c["efficiency"] for c in lbc.values()], color="#3b7dd8")
            a.axhline(0.95, color="k", ls="--", lw=1, label="target 0.95")
            a.set_title(f"latency-bound efficiency (L={lb['latency_ms']} ms, C={lb['concurrency']})")
            a.legend()
        if rlc:
            names = list(rlc)
            x = range(len(names))
            a2 = b
            a2.bar([i - 0.2 for i in x], [rlc[k]["completed_share"] for k in names], 0.4, label="completed share")
            a2.bar([i + 0.2 for i in x], [rlc[k]["time_ratio"] for k in names], 0.4, label="time ÷ ideal")
            a2.set_xticks(list(x), names)
            a2.axhline(1.0, color="k", ls="--", lw=1)
            a2.set_title("under a rate limit")
            a2.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "limits.png", dpi=100)
        plt.close(fig)
        files.append("limits.png")
    mem = summary.get("memory", {})
    if mem.get("runs"):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([r["n"] for r in mem["runs"]], [r["peak_rss_mb"] for r in mem["runs"]], "o-")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("requests")
        ax.set_ylabel("peak RSS (MB)")
        ax.set_title("tcia-async generate: peak memory")
        fig.tight_layout()
        fig.savefig(out_dir / "memory.png", dpi=100)
        plt.close(fig)
        files.append("memory.png")
    return {"files": files}
