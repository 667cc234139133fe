"""Scenario `resume`: `tcia-async generate` killed with SIGKILL about half way, then the same command rerun.

The simulator answers after a latency L, so C requests are in flight at any moment of the first run. The
harness watches the simulator's ledger and sends SIGKILL once it has received N/2 requests. Figures:

- `received_at_kill`: requests the simulator had received when the client died.
- `answered_at_kill`: requests the simulator answered successfully (the provider's billed calls) by then;
  the rest of `received_at_kill` were cut off on the wire by the kill.
- `written_at_kill`: complete lines in RESULTS at the kill (the client may buffer; informational).
- `saved_at_kill`: answers the client had made durable before it died = the requests the rerun did not send
  (N - requests the simulator received during the rerun; no faults are injected, so no request is retried).
- `in_flight_at_kill` = `received_at_kill` - `saved_at_kill`: requests the provider had received whose answers
  the client had not made durable: those on the wire, plus answers received but not yet committed to the cache
  (the cache writes in batches). The rerun sends all of them again.
- `duplicates`: the simulator's count of successful answers to content it had already answered, after the
  rerun = answered_at_kill - saved_at_kill: the calls paid twice. The promise is duplicates <= C.
- `rerun_complete`: RESULTS holds each custom_id exactly once after the rerun.
- `replay_rps`: a third run over the same input and cache through the engine's Python API, with every answer
  cached: answers per second from the cache (`replay_sent` must be 0).

Watching a separate process has no event to wait on (short of inotify), so the harness reads the simulator's
ledger every `poll_ms` milliseconds; the kill lands within that interval of the half-way mark.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import orjson

from common import (HERE, PY, ROOT, SimProcess, SimSettings, child_env, count_lines, engine_available,
                    engine_command, kill_group, run_child, sim_requests, watchdog, write_chat_requests)

NAME = "resume"


def _custom_ids_once(path, n: int) -> bool:
    seen = set()
    with open(path, "rb") as fh:
        for raw in fh:
            cid = orjson.loads(raw)["custom_id"]
            if cid in seen:
                return False
            seen.add(cid)
    return len(seen) == n


def run(ctx) -> dict:
    p = ctx.params(NAME)
    n, c, latency_ms = p["n"], p["c"], p["latency_ms"]
    poll = p.get("poll_ms", 20) / 1000.0
    out: dict = {"n": n, "concurrency": c, "latency_ms": latency_ms, "poll_ms": poll * 1000}
    inp = write_chat_requests(ctx.work / f"requests-resume-{n}.jsonl", n, tag="resume")
    results = ctx.work / f"{NAME}.results.jsonl"
    cache = ctx.work / f"{NAME}-cache.db"
    with SimProcess(SimSettings(latency_ms=latency_ms), ctx.log("sim")) as sim:
        out["simulator"] = sim.label
        sim.reset()
        argv, label = engine_command(inp, results, sim.base_url, c, cache=cache)
        if argv is None:
            return {**out, "skipped": label, "duplicates": None, "in_flight_at_kill": None, "replay_rps": None}
        out["command"] = label
        log = open(ctx.log(NAME), "ab")
        log.write(("\n$ " + " ".join(argv) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=child_env(), cwd=ROOT, start_new_session=True)
        guard = None
        seen = 0
        try:
            ctx.say(f"  generate pid {proc.pid} started; SIGKILL at {n // 2} requests received")
            guard = watchdog(ctx.timeout, proc)
            while proc.poll() is None:
                seen = sim_requests(sim.stats())
                if seen >= n // 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(poll)
            proc.wait()
        finally:
            if guard is not None:
                guard.cancel()
            if proc.returncode is None:  # interrupted before the planned kill: the client must not outlive us
                kill_group(proc)
                proc.wait()
            log.close()
        killed_after = time.perf_counter() - t0
        if proc.returncode != -signal.SIGKILL:
            return {**out, "error": f"generate ended with {proc.returncode} before the kill "
                    f"(simulator had seen {seen} of {n})", "duplicates": None, "in_flight_at_kill": None,
                    "replay_rps": None}
        # Requests already on the wire when the client died may still be read by the server: let them land
        # (one latency and a margin) before reading the ledger.
        time.sleep(latency_ms / 1000.0 + 0.3)
        at_kill = sim.stats()
        received_at_kill = sim_requests(at_kill)
        answered_at_kill = int(at_kill.get("ok", 0))
        written_at_kill = count_lines(results)
        ctx.say(f"  killed after {killed_after:.2f}s: simulator had received {received_at_kill}, "
                f"{written_at_kill} result lines written")

        summary_path = ctx.work / f"{NAME}-rerun-summary.json"
        rerun_argv = argv + (["--summary-json", str(summary_path)] if label == "tcia-async generate" else [])
        rerun = run_child(rerun_argv, ctx.log(NAME), timeout=ctx.timeout)
        after = sim.stats()
        if summary_path.exists():  # the command's own account of the rerun (cached vs sent), for cross-checking
            out["rerun_summary"] = json.loads(summary_path.read_text())
            out["rerun_cached"] = out["rerun_summary"].get("cached")
        rerun_sent = sim_requests(after) - received_at_kill
        saved = n - rerun_sent
        out.update({
            "killed_after_s": round(killed_after, 3),
            "received_at_kill": received_at_kill,
            "answered_at_kill": answered_at_kill,
            "written_at_kill": written_at_kill,
            "saved_at_kill": saved,
            "in_flight_at_kill": received_at_kill - saved,
            "rerun_exit_code": rerun.returncode,
            "rerun_sent": rerun_sent,
            "rerun_wall_s": round(rerun.wall_s, 3),
            "duplicates": int(after.get("duplicates", 0)),
            "sim_unique": after.get("unique"),
            "rerun_complete": rerun.returncode == 0 and _custom_ids_once(results, n),
        })
        ctx.say(f"  rerun: sent {rerun_sent}, simulator duplicates {out['duplicates']}, "
                f"in flight at kill {out['in_flight_at_kill']}, complete {out['rerun_complete']}")

        skip_engine = engine_available()
        if skip_engine:
            out["replay_rps"] = None
            out["replay_skipped"] = skip_engine
            return out
        before = sim_requests(sim.stats())
        rep = run_child([PY, str(HERE / "clients.py"), "engine", "--base-url", sim.base_url, "--input", str(inp),
                         "--output", str(ctx.work / f"{NAME}-replay.results.jsonl"), "-c", str(c),
                         "--cache", str(cache)], ctx.log(NAME), timeout=ctx.timeout).report
        out["replay_sent"] = sim_requests(sim.stats()) - before
        out["replay_rps"] = rep.get("rps")
        out["replay_cpu_us"] = rep.get("cpu_us")
        out["replay_ok"] = rep.get("ok")
        ctx.say(f"  replay from cache: {out['replay_rps']} answers/s, sent {out['replay_sent']}")
    return out
