"""Scenario `rate_limited`: the simulator enforces a rate limit and answers 429 beyond it.

The engine is given the same limits the provider enforces (as a user would configure them), and must finish
every request in about the ideal time with almost no 429s. The openai SDK (its default 2 retries, honouring
Retry-After) runs in the same run for reference: how many of its requests complete, and how fast.

Ideal time. The simulator's limits are rolling windows (1 s for RPS, 60 s for RPM and TPM) that start empty,
as providers' do: the first `limit` requests may go at once, and the window admits the next `limit` one window
later. So ideal = ceil(max(0, N - limit) / limit) x window + latency, the larger of the request bound and the
token bound (the simulator charges prompt tokens + max_tokens per request). `time_ratio` = run-window wall
time / ideal. Also reported: wall / (N / rate) (`time_ratio_vs_n_over_rate`), the issue's formula, which ignores the
initial burst: N / rate is one window longer than the ideal, so the two agree only as N grows. `share_429` = answers with status
429 / all requests the simulator received. `completed_share` = successful results / N.
"""

from __future__ import annotations

import heapq

from common import SimProcess, SimSettings, engine_available, sim_requests, sim_status, write_chat_requests

from throughput import run_client

MAX_TOKENS = 16  # what write_chat_requests puts in every body

NAME = "rate_limited"


def ideal_seconds(n: int, settings: SimSettings, tokens_per_request: float | None,
                  concurrency: int | None = None) -> tuple[float, float]:
    """(ideal time, plain N / rate) for `n` requests under `settings`.

    The ideal is the finishing time of the best possible client: every request is sent at the earliest moment
    that both a concurrency slot is free (each request holds one for the latency) and every rolling window
    (1 s for RPS, 60 s for RPM/TPM, counted on arrival as the simulator counts) has room for it. Windows start
    empty, so the first `limit` requests may go at once. Computed by replaying that greedy schedule.
    """
    latency = settings.latency_ms / 1000.0
    windows = []  # (requests that fit in one window, period)
    plain = []
    for limit, period, per_request in ((settings.rps, 1.0, 1.0), (settings.rpm, 60.0, 1.0),
                                       (settings.tpm, 60.0, tokens_per_request or 0.0)):
        if limit and per_request:
            windows.append((max(1, int(limit // per_request)), period))
            plain.append(n * per_request / limit * period)
    slots = [0.0] * min(n, concurrency or n)  # when each slot is free again (a heap)
    sent: list[float] = []  # send times, nondecreasing
    finish = 0.0
    for _ in range(n):
        t = slots[0]
        for fit, period in windows:
            if len(sent) >= fit:
                t = max(t, sent[-fit] + period)
        sent.append(t)
        heapq.heapreplace(slots, t + latency)
        finish = max(finish, t + latency)
    return finish, (max(plain) if plain else latency)


def run(ctx) -> dict:
    p = ctx.params(NAME)
    n, c = p["n"], p["c"]
    settings = SimSettings(latency_ms=p["latency_ms"], rpm=p.get("rpm"), tpm=p.get("tpm"), rps=p.get("rps"))
    inp = write_chat_requests(ctx.work / f"requests-{n}.jsonl", n)
    out: dict = {"n": n, "concurrency": c, "latency_ms": settings.latency_ms, "limits": {
        "rpm": settings.rpm, "tpm": settings.tpm, "rps": settings.rps}, "clients": {}}
    engine_skip = engine_available()
    if engine_skip:
        out["engine_skipped"] = engine_skip
        ctx.say(f"  engine skipped: {engine_skip}")
    limit_flags = []
    for flag, value in (("--rpm", settings.rpm), ("--tpm", settings.tpm), ("--rps", settings.rps)):
        if value:
            limit_flags += [flag, str(int(value))]
    with SimProcess(settings, ctx.log("sim")) as sim:
        out["simulator"] = sim.label
        clients = out["clients"]
        plan = []
        if engine_skip is None:
            plan.append(("engine", ["--cache", str(ctx.work / f"{NAME}-engine-cache.db")] + limit_flags))
        else:
            clients["engine"] = {"skipped": engine_skip}
        if p.get("sdk"):
            plan.append(("openai_sdk", []))
        else:
            clients["openai_sdk"] = {"skipped": "not run at this size"}
        for client, extra in plan:
            rep = run_client(ctx, sim, client, inp, f"{NAME}-{client}", c, extra)
            stats = sim.stats()
            if "error" not in rep:
                ok = max(1, int(stats.get("ok", rep.get("ok") or 1)))
                # The simulator charges prompt tokens + max_tokens (16 in these inputs) per request.
                per_req = stats.get("tokens", {}).get("prompt", 0) / ok + MAX_TOKENS
                ideal, plain = ideal_seconds(n, settings, per_req, c)
                received = sim_requests(stats)
                rep["completed_share"] = round((rep.get("ok") or 0) / n, 4)
                rep["ideal_s"] = round(ideal, 3)
                rep["time_ratio"] = round(rep["wall_s"] / ideal, 3)
                rep["time_ratio_vs_n_over_rate"] = round(rep["wall_s"] / plain, 3)
                rep["sim_received"] = received
                rep["share_429"] = round(sim_status(stats, 429) / received, 5) if received else None
                ctx.say(f"  {client}: {rep['completed_share']:.1%} completed, time/ideal {rep['time_ratio']}, "
                        f"429 share {rep['share_429']}")
            clients[client] = rep
    eng = clients["engine"]
    out["time_ratio"] = eng.get("time_ratio")
    out["share_429"] = eng.get("share_429")
    out["completed_share"] = eng.get("completed_share")
    out["ideal_s"] = eng.get("ideal_s")
    out["wall_s"] = eng.get("wall_s")
    out["openai_sdk_completed_share"] = clients["openai_sdk"].get("completed_share")
    out["openai_sdk_time_ratio"] = clients["openai_sdk"].get("time_ratio")
    return out
