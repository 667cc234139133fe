"""Scenario `pipeline`: does the TCIA pipeline keep the wire as busy as plain bulk requests do?

`tcia-async run` on the shipped seeds and contexts against the simulator (latency L, concurrency C), then
`tcia-async generate` with the same L and C on chat requests, in the same run:

    overlap_ratio = pipeline wall time / (pipeline requests / engine req/s)

1.0 means the pipeline's stages overlap perfectly (the wire never waits for a stage); the goal is <= 1.15. The
pipeline's wall time is the report's (from the first seed in to the last answer selected: process start-up and
the report's embeddings are left out, as generate's start-up is by its own window). Its peak RSS, with every
sampled set of every seed passing through, is recorded too (goal: under 300 MB with tens of thousands of sets:
the full profile runs 12 seeds, the shipped three and nine instructions of the shipped corpus, x 2,000 sets).
"""

from __future__ import annotations

import json

from common import PY, SimProcess, SimSettings, run_child, write_chat_requests
from throughput import run_client

NAME = "pipeline"
SETTINGS = """[explore]
sample = {sample}
[contexts]
per_instruction = 2
[respond]
generators = ["gpt-4.1-mini", "gpt-4.1-nano"]
[engine]
concurrency = {c}
"""


def write_seeds(path, data, n: int) -> None:
    """The shipped seeds, then instructions of the shipped corpus with three or more requirements (no contexts:
    answered without one), up to `n` seeds."""
    lines = data.joinpath("seeds.jsonl").read_text().splitlines()
    decomposed = {json.loads(x)["id"]: json.loads(x)["decomposition"]
                  for x in data.joinpath("decompositions.jsonl").read_text().splitlines()}
    for x in data.joinpath("corpus.jsonl").read_text().splitlines():
        if len(lines) >= n:
            break
        rec = json.loads(x)
        tasks = decomposed.get(rec["id"], {}).get("tasks") or []
        if len(tasks) == 1 and len(tasks[0]["constraints"]) >= 3:
            lines.append(json.dumps({"id": f"corpus-{rec['id']}", "instruction": rec["instruction"]}))
    path.write_text("\n".join(lines[:n]) + "\n")


def run(ctx) -> dict:
    p = ctx.params(NAME)
    sample, c, latency_ms, n_engine = p["sample"], p["c"], p["latency_ms"], p["engine_n"]
    from common import ROOT

    data = ROOT / "tcia_async" / "data"
    seeds = ctx.work / f"{NAME}-seeds.jsonl"
    write_seeds(seeds, data, p.get("seeds", 3))
    conf = ctx.work / f"{NAME}.toml"
    conf.write_text(SETTINGS.format(sample=sample, c=c))
    out_dir = ctx.work / f"{NAME}-run"
    out: dict = {"seeds": p.get("seeds", 3), "sets_per_seed": sample, "concurrency": c, "latency_ms": latency_ms,
                 "overlap_ratio": None}
    with SimProcess(SimSettings(latency_ms=latency_ms), ctx.log("sim")) as sim:
        argv = [PY, "-m", "tcia_async", "run", str(seeds), "--contexts", str(data / "contexts.jsonl"),
                "--out", str(out_dir), "--base-url", sim.base_url, "--config", str(conf), "--quiet"]
        res = run_child(argv, ctx.log(NAME), timeout=ctx.timeout)
        if res.returncode not in (0, 4):  # 4: done, with some items failed (counted below)
            out["error"] = f"tcia-async run exited {res.returncode}; see {ctx.log(NAME)}"
            return out
        report = json.loads((out_dir / "report.json").read_text())
        sent = report["requests"]["total"]["sent"]
        wall = report["time"]["wall_s"]
        inp = write_chat_requests(ctx.work / f"{NAME}-requests-{n_engine}.jsonl", n_engine)
        engine = run_client(ctx, sim, "engine", inp, f"{NAME}-engine", c,
                            ["--cache", str(ctx.work / f"{NAME}-engine-cache.db")], n_expected=n_engine)
    rps = engine.get("rps")
    out.update({
        "pipeline_requests": sent, "pipeline_wall_s": wall, "pipeline_rps": round(sent / wall, 1) if wall else None,
        "engine_rps": rps, "ideal_rps": round(c / (latency_ms / 1000.0), 1),
        "overlap_ratio": round(wall / (sent / rps), 3) if rps and sent else None,
        "peak_rss_mb": round(res.max_rss_mb, 1), "sets": report["funnel"]["sets_sampled"],
        "failed_items": sum(report["funnel"]["failures"].values()),
        "first_judged_answer_s": report["time"]["first_judged_answer_s"],
        "last_compose_s": report["time"]["last_compose_s"],
    })
    ctx.say(f"  pipeline: {sent} requests in {wall:.2f} s ({out['pipeline_rps']}/s); engine {rps}/s at the same "
            f"latency and concurrency: overlap ratio {out['overlap_ratio']}; peak RSS {out['peak_rss_mb']} MB")
    return out
