"""Scenario `throughput`: zero-latency simulator, N chat requests at concurrency C.

The engine (cache, limiter and token counting on) against the floor (raw aiohttp + uvloop + orjson) and the
openai SDK with a semaphore, plus LiteLLM and Bespoke Curator when installed, all in the same run against the
same simulator process, which is reset between clients. The engine and the floor run `rounds` times,
interleaved, and each keeps its best round (the rate the machine can sustain when the noise is least); the SDK
and the peers, which are far slower, run once. CPU µs per request is the client process's own CPU time over its
run window divided by N. `tcia-async generate` itself is also timed end to end once (start-up included).
"""

from __future__ import annotations

import statistics

from common import (PY, HERE, SimProcess, SimSettings, engine_available, generate_argv, generate_cli_available,
                    have, run_child, sim_requests, sim_status, write_chat_requests)

NAME = "throughput"


def run_client(ctx, sim: SimProcess, client: str, input_path, tag: str, c: int, extra: list[str] | None = None,
               n_expected: int | None = None) -> dict:
    """Run one measured client against a freshly reset simulator; its report plus the server's view."""
    sim.reset()
    cpu0 = sim.cpu_seconds()
    out = ctx.work / f"{NAME}-{tag}.results.jsonl"
    argv = [PY, str(HERE / "clients.py"), client, "--base-url", sim.base_url, "--input", str(input_path),
            "--output", str(out), "-c", str(c)] + (extra or [])
    res = run_child(argv, ctx.log(NAME), timeout=ctx.timeout)
    cpu1 = sim.cpu_seconds()
    stats = sim.stats()
    if res.returncode != 0 or not res.report:
        return {"error": f"{client} exited {res.returncode}", "stderr_tail": res.stderr_tail}
    rep = dict(res.report)
    rep["process_cpu_s"] = round(res.cpu_s, 3)  # whole process: interpreter start and imports included
    rep["max_rss_mb"] = round(res.max_rss_mb, 1)
    rep["sim_requests"] = sim_requests(stats)
    rep["sim_429"] = sim_status(stats, 429)
    if cpu0 is not None and cpu1 is not None and rep.get("n"):
        rep["sim_cpu_us"] = round((cpu1 - cpu0) / rep["n"] * 1e6, 1)
    if n_expected is not None and rep.get("ok") != n_expected:
        rep["warning"] = f"{rep.get('ok')} of {n_expected} requests succeeded"
    ctx.say(f"  {tag}: {rep.get('rps')} req/s, {rep.get('cpu_us')} CPU µs/request, ok {rep.get('ok')}/{rep.get('n')}")
    return rep


def best(runs: list[dict]) -> dict:
    good = [r for r in runs if r.get("rps")]
    return max(good, key=lambda r: r["rps"]) if good else (runs[0] if runs else {"error": "no run"})


def run(ctx) -> dict:
    p = ctx.params(NAME)
    n, c, rounds = p["n"], p["c"], p["rounds"]
    inp = write_chat_requests(ctx.work / f"requests-{n}.jsonl", n)
    out: dict = {"n": n, "concurrency": c, "rounds": rounds, "clients": {}}
    engine_skip = engine_available()
    if engine_skip:
        out["engine_skipped"] = engine_skip
        ctx.say(f"  engine skipped: {engine_skip}")
    with SimProcess(SimSettings(latency_ms=0), ctx.log("sim")) as sim:
        out["simulator"] = sim.label
        runs: dict[str, list[dict]] = {"engine": [], "raw": []}
        for r in range(rounds):
            if engine_skip is None:
                cache = ctx.work / f"{NAME}-engine-cache-{r}.db"
                runs["engine"].append(run_client(ctx, sim, "engine", inp, f"engine-r{r}", c,
                                                 ["--cache", str(cache)], n_expected=n))
            runs["raw"].append(run_client(ctx, sim, "raw", inp, f"raw-r{r}", c, n_expected=n))
        clients = out["clients"]
        clients["engine"] = best(runs["engine"]) if engine_skip is None else {"skipped": engine_skip}
        clients["raw"] = best(runs["raw"])
        for name in ("engine", "raw"):
            if runs[name]:
                clients[name]["all_rounds_rps"] = [x.get("rps") for x in runs[name]]
        sdk_n = min(n, p.get("sdk_n", n))
        sdk_inp = write_chat_requests(ctx.work / f"requests-{sdk_n}.jsonl", sdk_n)
        clients["openai_sdk"] = run_client(ctx, sim, "openai_sdk", sdk_inp, "openai_sdk", c, n_expected=sdk_n)
        for peer, module in (("litellm", "litellm"), ("curator", "bespokelabs.curator")):
            if have(module.split(".")[0]) and have(module):
                clients[peer] = run_client(ctx, sim, peer, sdk_inp, peer, c, n_expected=sdk_n)
            else:
                clients[peer] = {"skipped": f"{module} is not installed (optional extra `peers`)"}
        cli_skip = generate_cli_available()
        if cli_skip is None:
            sim.reset()
            res = run_child(generate_argv(inp, ctx.work / f"{NAME}-cli.results.jsonl", sim.base_url, c,
                                          cache=ctx.work / f"{NAME}-cli-cache.db", rpm=1e9, tpm=1e12),
                            ctx.log(NAME), timeout=ctx.timeout)
            stats = sim.stats()
            out["engine_cli"] = {
                "exit_code": res.returncode,
                "wall_s": round(res.wall_s, 3),
                "rps_end_to_end": round(n / res.wall_s, 1),
                "cpu_us_end_to_end": round(res.cpu_s / n * 1e6, 1),
                "sim_requests": sim_requests(stats),
                "note": "whole command: interpreter start, imports, reading and writing files included",
            }
            ctx.say(f"  tcia-async generate end to end: {out['engine_cli']['rps_end_to_end']} req/s")
        else:
            out["engine_cli"] = {"skipped": cli_skip}

    eng, raw, sdk = clients["engine"], clients["raw"], clients["openai_sdk"]
    out["engine_rps"] = eng.get("rps")
    out["engine_cpu_us"] = eng.get("cpu_us")
    out["floor_rps"] = raw.get("rps")
    out["floor_cpu_us"] = raw.get("cpu_us")
    out["openai_sdk_rps"] = sdk.get("rps")
    out["openai_sdk_cpu_us"] = sdk.get("cpu_us")
    for peer in ("litellm", "curator"):
        out[f"{peer}_rps"] = clients[peer].get("rps")
        out[f"{peer}_cpu_us"] = clients[peer].get("cpu_us")
    out["ratio_floor"] = round(out["engine_rps"] / out["floor_rps"], 3) if out["engine_rps"] and out["floor_rps"] else None
    # The same ratio round by round (each engine round against the floor round run right after it), and its
    # median: on a machine whose speed drifts during the run this moves less than the best against the best.
    pairs = [round(e / r, 3) for e, r in zip(eng.get("all_rounds_rps") or [], raw.get("all_rounds_rps") or [])
             if e and r]
    out["ratio_floor_by_round"] = pairs
    out["ratio_floor_median_round"] = statistics.median(pairs) if pairs else None
    out["engine_loop_cpu_us"] = eng.get("loop_cpu_us")
    out["ratio_sdk"] = round(out["engine_rps"] / out["openai_sdk_rps"], 2) if out["engine_rps"] and out["openai_sdk_rps"] else None
    return out
