"""Scenario `memory`: peak RSS of `tcia-async generate` over N requests (zero latency, cache and limiter on).

Run at N and at a tenth of N: when input streams in and results stream out, the two peaks are about the same.
Peak RSS is the child's own maximum resident set (`ru_maxrss` from os.wait4 on exactly that process).
The input file is written line by line, so the harness itself does not grow with N either.
"""

from __future__ import annotations

from common import SimProcess, SimSettings, engine_command, run_child, sim_requests, write_chat_requests

NAME = "memory"


def measure(ctx, sim: SimProcess, n: int, c: int) -> dict:
    inp = write_chat_requests(ctx.work / f"requests-{n}.jsonl", n)
    sim.reset()
    argv, _ = engine_command(inp, ctx.work / f"{NAME}-{n}.results.jsonl", sim.base_url, c,
                             cache=ctx.work / f"{NAME}-{n}-cache.db", rpm=1e9, tpm=1e12)
    res = run_child(argv, ctx.log(NAME), timeout=ctx.timeout)
    received = sim_requests(sim.stats())
    (ctx.work / f"{NAME}-{n}.results.jsonl").unlink(missing_ok=True)
    out = {"n": n, "exit_code": res.returncode, "peak_rss_mb": round(res.max_rss_mb, 1),
           "wall_s": round(res.wall_s, 2), "rps_end_to_end": round(n / res.wall_s, 1), "sim_requests": received}
    ctx.say(f"  n={n}: peak RSS {out['peak_rss_mb']} MB, {out['rps_end_to_end']} req/s end to end, "
            f"exit {res.returncode}")
    return out


def run(ctx) -> dict:
    p = ctx.params(NAME)
    n, n_small, c = p["n"], p["n_small"], p["c"]
    argv, label = engine_command(ctx.work / "x", ctx.work / "y", "http://127.0.0.1:1/v1", c, cache=ctx.work / "z")
    if argv is None:
        return {"n": n, "peak_rss_mb": None, "skipped": label}
    with SimProcess(SimSettings(latency_ms=0), ctx.log("sim")) as sim:
        small = measure(ctx, sim, n_small, c)
        big = measure(ctx, sim, n, c)
        sim_label = sim.label
    growth = round(big["peak_rss_mb"] / small["peak_rss_mb"], 3) if small["peak_rss_mb"] else None
    return {"n": n, "peak_rss_mb": big["peak_rss_mb"], "n_small": n_small, "peak_rss_mb_small": small["peak_rss_mb"],
            "growth": growth, "concurrency": c, "simulator": sim_label, "command": label, "runs": [small, big]}
