"""The run report: RUNDIR/report.json, report.md and PNG plots (counts, the paper's measures, cost and speed).

Diversity of a set of instructions is the mean of 1 - cosine similarity over all pairs (the paper's measure).
It is computed exactly over every pair, without sampling: for unit vectors u_i with sum S,
sum over pairs i != j of u_i . u_j = |S|^2 - n, so the mean similarity is (|S|^2 - n) / (n (n - 1)): O(n d).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

# The paper's figures (Ma et al., arXiv 2508.20374), for comparison beside ours.
PAPER = {
    "tcia": {"diversity": {1: 0.844, 2: 0.815, 3: 0.792}, "on_task": {1: 1.0, 2: 1.0, 3: 1.0}},
    "evol": {"diversity": {1: 0.798, 2: 0.725, 3: 0.680}, "on_task": {1: 0.8, 2: 0.6, 3: 0.6}},
}
PAPER_NOTE = ("paper: Ma et al., TCIA, arXiv 2508.20374; embeddings text-embedding-3-large; Evol-Instruct on-task "
              "ratios read from its figure (about 80 / 60 / below 60 %)")


def diversity(vectors: np.ndarray) -> float | None:
    """Mean of 1 - cos over all pairs of rows (None for fewer than two)."""
    v = np.asarray(vectors, dtype=np.float64)
    n = v.shape[0]
    if n < 2:
        return None
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    u = v / np.maximum(norms, 1e-30)
    s = u.sum(axis=0)
    mean_cos = (float(s @ s) - float((u * u).sum())) / (n * (n - 1))
    return 1.0 - mean_cos


def _whole(tm: dict[str, Any]) -> str:
    """The rest of a run's time beside its pipeline's: the diversity measurement, the whole command; for a rerun
    that replayed every answer from the cache, what the replay took."""
    parts = []
    if tm.get("diversity_s") is not None:
        parts.append(f"diversity measured in {tm['diversity_s']:.1f} s")
    if tm.get("command_s") is not None:
        parts.append(f"{tm['command_s']:.1f} s in all")
    text = f" ({', '.join(parts)})" if parts else ""
    replay = tm.get("replay")
    if replay is None:
        return text
    if not replay.get("kept"):
        return f"{text}: a rerun that replayed every answer from the cache; these are the replay's timings"
    took = f"{replay['command_s']:.1f} s" if replay.get("command_s") is not None else "–"
    return f"{text} when the requests were sent; this rerun replayed every answer from the cache in {took}"


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}" + ("" if n == 1 else "s")


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _counters(c: Any) -> dict[str, Any]:
    d = msgspec.to_builtins(c)
    d["cost"] = round(d["cost"], 6)
    d["cost_full"] = round(d["cost_full"], 6)
    d["cost_replayed"] = round(d["cost_replayed"], 6)
    d["batch_cost"] = round(d["batch_cost"], 6)
    d["batch_saved"] = round(d["batch_saved"], 6)
    d["wire_s"] = round(d["wire_s"], 3)
    return d


def build_report(result: dict[str, Any], rec: Any, div: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json's content from the run's result (flows/run.py) and its Recorder."""
    eng = result["engine"]
    method = result["method"]
    per_hop = []
    for hop in sorted(rec.hops):
        row = msgspec.to_builtins(rec.hops[hop])
        row["on_task_ratio"] = _r(row["on_task"] / row["on_task_checked"]) if row["on_task_checked"] else None
        d = (div or {}).get("per_hop", {}).get(hop)
        row["diversity"] = _r(d["diversity"]) if d else None
        row["diversity_instructions"] = d["n"] if d else 0
        paper = PAPER.get(method, {})
        row["paper_diversity"] = paper.get("diversity", {}).get(hop)
        row["paper_on_task_ratio"] = paper.get("on_task", {}).get(hop)
        per_hop.append(row)
    stages = {st.name: msgspec.to_builtins(st) for st in result["stages"]}
    for name, st in stages.items():
        st.pop("per_second", None)
        span = (st["last_out_s"] or 0.0) - (st["first_out_s"] or 0.0)
        st["items_per_s"] = round(st["items_out"] / span, 2) if span > 0 else None
        calls = eng.stages.get(name)
        st["requests"] = _counters(calls) if calls is not None else None
    llm_stages = {name: _counters(c) for name, c in eng.stages.items()}
    kept_sft = rec.sft
    cost = eng.cost + eng.cost_replayed  # what the data cost to make, whichever run paid for it
    constraints = _constraint_report(rec)
    judge = {dim: {str(k): v for k, v in sorted(c.items())} for dim, c in rec.scores.items()}
    compose = next((s for s in result["stages"] if s.name in ("compose", "evol")), None)
    judge_stage = next((s for s in result["stages"] if s.name == "judge"), None)
    return {
        "method": method,
        "simulated": result["simulated"],
        "status": result["status"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "db": result["db"],
        "embedding_model": result["embedding_model"],
        "seeds": result["seeds"],
        "seeds_decomposed": rec.seeds_decomposed,
        "retrieval": rec.retrievals,
        "per_hop": per_hop,
        "diversity": {"method": "mean of 1 - cosine over all pairs of a seed's composed instructions of a hop "
                                "(exact over the pairs; at most `sample` instructions of a seed and hop, drawn "
                                "with the run seed); averaged over seeds",
                      "sample": (div or {}).get("sample"), "embedded": (div or {}).get("embedded"),
                      "composed": (div or {}).get("composed"),
                      "embedding_model": result["embedding_model"], "per_seed": (div or {}).get("per_seed", {}),
                      "reference": _r((div or {}).get("reference")),
                      "reference_note": "the diversity of instructions of every kind of work (the shipped corpus) "
                                        "with the same model: the scale of this model's numbers"},
        "funnel": {
            "sets_sampled": sum(r["sampled"] for r in per_hop),
            "composed": sum(r["composed"] for r in per_hop),
            "verified": sum(r["verified"] for r in per_hop),
            "valid": sum(r["valid"] for r in per_hop),
            "on_task": sum(r["on_task"] for r in per_hop),
            "kept": sum(r["kept"] for r in per_hop),
            "dropped": dict(rec.dropped),
            "pairs": rec.pairs,
            "sft_examples": kept_sft,
            "preference_pairs": rec.preferences,
            "failures": dict(rec.failures),
        },
        "constraints": constraints,
        "answers": {"judge_scores": judge, "wins": dict(rec.wins), "preference_pairs": rec.preferences},
        "requests": {"total": _counters(eng.total()), "by_stage": llm_stages,
                     "by_model": {m: _counters(c) for m, c in eng.models.items()}},
        "cost": {"usd": round(cost, 6), "paid_by_this_run_usd": round(eng.cost, 6),
                 "replayed_from_cache_usd": round(eng.cost_replayed, 6),
                 "usd_at_full_price": round(eng.cost_full, 6),
                 "saved_by_prompt_cache_usd": round(eng.cost_full - eng.cost, 6),
                 "batch_usd": round(eng.batch_cost, 6), "saved_by_batch_usd": round(eng.batch_saved, 6),
                 "cached_prompt_tokens": eng.cached_tokens, "prompt_tokens": eng.prompt_tokens,
                 "per_1000_sft_examples_usd": round(cost / kept_sft * 1000, 6) if kept_sft else None,
                 "priced": bool(result["prices"]), "prices": result["prices"],
                 # Models that used tokens without a price: the cost above counts them as free.
                 "unpriced_models": sorted(m for m, c in eng.models.items() if m and m not in result["prices"]
                                           and (c.prompt_tokens or c.completion_tokens))},
        "time": {"wall_s": round(result["wall_s"], 3),  # the pipeline's
                 "diversity_s": _r(result.get("diversity_s"), 3),
                 "command_s": _r(result.get("command_s"), 3),  # the whole command, start-up included
                 "first_judged_answer_s": _r(judge_stage.first_out_s, 3) if judge_stage else None,
                 "last_compose_s": _r(compose.last_out_s, 3) if compose else None,
                 "requests_per_s": round(eng.sent / result["wall_s"], 2) if result["wall_s"] else None},
        "stages": stages,
        "batch": {"stages": sorted(result.get("batch", {})), "rounds": result.get("batch", {}),
                  "discount": result.get("batch_discount"),
                  "requests_by_batch": eng.batch_ok + eng.batch_replayed,
                  "requests_online": max(0, eng.sent - eng.batch_sent)},
        "config": result["config"],
        "paper": PAPER_NOTE,
    }



def plot_per_hop(plt: Any, path: Path, hops: list[int], runs: list[tuple[str, list[float] | None, list[float]]],
                 diversity_note: str = "") -> None:
    """Diversity and on-task ratio per hop of `runs` (label, diversity or None when not comparable, on-task),
    with the paper's TCIA and Evol-Instruct lines, as one PNG at `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, diversity, on_task in runs:
        if diversity is not None:
            axes[0].plot(hops, diversity, "o-", label=label)
        axes[1].plot(hops, on_task, "o-", label=label)
    for name, style in (("tcia", "--"), ("evol", ":")):
        axes[0].plot(hops, [PAPER[name]["diversity"].get(h) for h in hops], style, color="grey",
                     label=f"paper {name}")
        axes[1].plot(hops, [PAPER[name]["on_task"].get(h) for h in hops], style, color="grey",
                     label=f"paper {name}")
    axes[0].set_title("diversity per hop" + diversity_note)
    axes[1].set_title("on-task ratio per hop")
    for ax in axes:
        ax.set_xlabel("hop")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def _constraint_report(rec: Any) -> dict[str, Any]:
    unique: dict[str, int] = {}
    by_origin: dict[str, int] = {}
    for (text, category, origin), n in rec.constraint_use.items():
        unique[category] = unique.get(category, 0) + 1
        by_origin[origin] = by_origin.get(origin, 0) + n
    total = sum(by_origin.values())
    retrieved = sorted(((n, t, c) for (t, c, o), n in rec.constraint_use.items() if o == "retrieved"),
                       key=lambda x: (-x[0], x[1]))[:15]
    return {
        "unique": len(rec.constraint_use),
        "unique_by_category": dict(sorted(unique.items())),
        "set_sizes": {str(k): v for k, v in sorted(rec.set_sizes.items())},
        "share_inherited_from_seed": _r(by_origin.get("seed", 0) / total) if total else None,
        "share_retrieved": _r(by_origin.get("retrieved", 0) / total) if total else None,
        "most_used_retrieved": [{"text": t, "category": c, "uses": n} for n, t, c in retrieved],
    }


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.1f} %"
    return f"{x:.3f}" if isinstance(x, float) else f"{x:,}"


def render_markdown(r: dict[str, Any], plots: list[str]) -> str:
    f = r["funnel"]
    lines = [f"# tcia-async run report ({r['method']})", ""]
    if r["simulated"]:
        lines += ["**Simulated data**: the provider was tcia-async's simulator; every answer is rule-made, not a "
                  "model's. The figures show the machinery, not the method's quality.", ""]
    lines += [f"Seeds {r['seeds']} ({r['seeds_decomposed']} decomposed); {f['sets_sampled']:,} constraint sets "
              f"sampled, {f['composed']:,} instructions composed, {f['kept']:,} kept; {f['pairs']:,} "
              f"(instruction, context) pairs answered; {f['sft_examples']:,} SFT examples and "
              f"{f['preference_pairs']:,} preference pairs. Pipeline {r['time']['wall_s']:.1f} s{_whole(r['time'])}.", ""]
    lines += ["## Per hop", "", "| hop | sets (Algorithm 1) | unique | sampled | composed | verified | valid | "
              "on task | kept | diversity | paper diversity | on-task ratio | paper on-task |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in r["per_hop"]:
        lines.append(f"| {h['hop']} | {_fmt(h['sets'])} | {_fmt(h['sets_unique'])} | {_fmt(h['sampled'])} | "
                     f"{_fmt(h['composed'])} | {_fmt(h['verified'])} | {_fmt(h['valid'])} | {_fmt(h['on_task'])} | "
                     f"{_fmt(h['kept'])} | {_fmt(h['diversity'])} | {_fmt(h['paper_diversity'])} | "
                     f"{_fmt(h['on_task_ratio'], True)} | {_fmt(h['paper_on_task_ratio'], True)} |")
    ref = r["diversity"].get("reference")
    d = r["diversity"]
    lines += ["", f"Diversity: {d['method']}: {_fmt(d.get('embedded'))} of {_fmt(d.get('composed'))} instructions "
              f"embedded (sample {d.get('sample') or 'all'}), with `{r['embedding_model']}`. "
              f"Paper columns: {r['paper']}. Diversity values depend on the embedding model: with "
              f"`{r['embedding_model']}`, {r['diversity'].get('reference_note', '')} measures "
              f"{_fmt(ref)}; compare hops and methods with one model, not our numbers with the paper's.", ""]
    if r["retrieval"]:
        lines += ["## Retrieval", "", "| seed | task type | nearest cluster | distance | pool |", "|---|---|---|---|---|"]
        for x in r["retrieval"]:
            lines.append(f"| {x['seed_id']} | {x['task_type']} | {x['cluster_name']} | {x['distance']:.3f} | "
                         f"{x['pool']} |")
        lines.append("")
    c = r["constraints"]
    lines += ["## Constraints (kept instructions)", "",
              f"{c['unique']} unique constraints; share inherited from the seed "
              f"{_fmt(c['share_inherited_from_seed'], True)}, retrieved {_fmt(c['share_retrieved'], True)}. "
              f"Unique by category: {', '.join(f'{k} {v}' for k, v in c['unique_by_category'].items()) or '–'}. "
              f"Set sizes: {', '.join(f'{k}: {v}' for k, v in c['set_sizes'].items()) or '–'}.", ""]
    if c["most_used_retrieved"]:
        lines += ["Most used retrieved constraints:", ""]
        lines += [f"- ({x['uses']}) [{x['category']}] {x['text']}" for x in c["most_used_retrieved"][:10]]
        lines.append("")
    dropped = ", ".join(f"{k} {v}" for k, v in f["dropped"].items()) or "none"
    failures = ", ".join(f"{k} {v}" for k, v in f["failures"].items()) or "none"
    lines += [f"Dropped instructions: {dropped}. Failures (see failures.jsonl): {failures}.", ""]
    a = r["answers"]
    lines += ["## Answers", "", "Judge scores (count of 1 / 2 / 3 / 4 / 5):", ""]
    for dim, dist in a["judge_scores"].items():
        lines.append(f"- {dim}: " + " / ".join(str(dist.get(str(s), 0)) for s in range(1, 6)))
    lines += ["", "Wins (best answer of a pair): " + (", ".join(f"{m} {n}" for m, n in a["wins"].items()) or "–"),
              f"; preference pairs {a['preference_pairs']}.", ""]
    co = r["cost"]
    t = r["requests"]["total"]
    lines += ["## Cost and speed", "",
              f"Requests sent {t['sent']:,} (answers {t['ok']:,}, {t['cached']:,} from the cache), retries "
              f"{t['retries']:,}, answered 429 {t['rate_limited']:,}. Tokens: prompt {t['prompt_tokens']:,} "
              f"(of which served from the provider's prompt cache {t['cached_tokens']:,}), completion "
              f"{t['completion_tokens']:,}.", ""]
    if co["priced"]:
        lines += [f"Cost of the data ${co['usd']:.4f} (${co['paid_by_this_run_usd']:.4f} paid by this run, "
                  f"${co['replayed_from_cache_usd']:.4f} by earlier runs: their answers were replayed from the "
                  f"cache); per 1,000 SFT examples ${_fmt(co['per_1000_sft_examples_usd'])}. The calls this run "
                  f"sent cost ${co['paid_by_this_run_usd']:.4f}; at full input price, without the provider's "
                  f"prompt cache, ${co['usd_at_full_price']:.4f} (saved ${co['saved_by_prompt_cache_usd']:.4f}).",
                  ""]
        if co.get("unpriced_models"):
            lines += [f"**Partial cost**: no price for {', '.join(f'`{m}`' for m in co['unpriced_models'])}; their "
                      "tokens count as free above. Add them to `[engine.prices]`.", ""]
    else:
        lines += ["No prices configured: set `[engine.prices.\"MODEL\"]` (input, output, cached_input: USD per 1M "
                  "tokens) to see the cost.", ""]
    b = r.get("batch") or {}
    if b.get("stages"):
        lines += [f"Stages run through the provider's Batch API: {', '.join(b['stages'])} "
                  f"({b['requests_by_batch']:,} answers from batches, this run's or replayed from earlier runs', "
                  f"{b['requests_online']:,} requests sent online by this run); "
                  f"batch price = {b['discount']} x online"
                  + (f", saving ${co['saved_by_batch_usd']:.4f}." if co["priced"] else "."), ""]
    lines += ["| stage | requests sent | answers | cached | failed | prompt tokens | cached prompt | completion | "
              "cost USD |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["requests"]["by_stage"].items():
        lines.append(f"| {name or '(none)'} | {s['sent']:,} | {s['ok']:,} | {s['cached']:,} | {s['failed']:,} | "
                     f"{s['prompt_tokens']:,} | {s['cached_tokens']:,} | {s['completion_tokens']:,} | "
                     f"{s['cost']:.4f} |")
    tm = r["time"]
    lines += ["", f"Pipeline {tm['wall_s']:.1f} s{_whole(tm)}; {_fmt(tm['requests_per_s'])} requests/s; first judged answer "
              f"at {_fmt(tm['first_judged_answer_s'])} s, last composition at {_fmt(tm['last_compose_s'])} s "
              "(stages overlap when the first is well before the second).", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plot(out: Path, r: dict[str, Any], stages: list[Any], timeline: bool = True) -> list[str]:
    """PNG plots next to the report (no display needed); the file names written (`timeline` False: the one there
    is kept)."""
    with warnings.catch_warnings():  # an empty run draws empty plots; matplotlib's warnings are not the user's
        warnings.simplefilter("ignore")
        return _plot(out, r, stages, timeline)


def _plot(out: Path, r: dict[str, Any], stages: list[Any], timeline: bool) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if timeline:
        fig, ax = plt.subplots(figsize=(9, 4))
        for st in stages:
            if st.per_second:
                ax.plot(range(len(st.per_second)), st.per_second, label=st.name, linewidth=1)
        ax.set_xlabel("seconds since the start")
        ax.set_ylabel("items finished per second")
        ax.set_title("Stage activity over time (overlap of stages)")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(out / "timeline.png", dpi=110)
        plt.close(fig)
    if (out / "timeline.png").exists():
        written.append("timeline.png")
    hops = [h for h in r["per_hop"] if h["hop"] > 0]
    if hops:
        xs = [h["hop"] for h in hops]
        plot_per_hop(plt, out / "per_hop.png", xs, [(f"this run ({r['method']})", [h["diversity"] for h in hops],
                                                    [h["on_task_ratio"] for h in hops])])
        written.append("per_hop.png")
    scores = r["answers"]["judge_scores"]
    if scores:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(scores)
        for i, (dim, dist) in enumerate(scores.items()):
            ax.bar([s + i * width for s in range(1, 6)], [dist.get(str(s), 0) for s in range(1, 6)], width,
                   label=dim)
        ax.set_xlabel("score")
        ax.set_ylabel("answers")
        ax.set_title("judge scores")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "judge_scores.png", dpi=110)
        plt.close(fig)
        written.append("judge_scores.png")
    return written


def headline(r: dict[str, Any]) -> str:
    f = r["funnel"]
    hops = ", ".join(f"hop {h['hop']}: diversity {_fmt(h['diversity'])}, on task {_fmt(h['on_task_ratio'], True)}"
                     for h in r["per_hop"])
    sim = " [simulated]" if r["simulated"] else ""
    cost = f", ${r['cost']['usd']:.4f}" if r["cost"]["priced"] else ""
    return (f"run complete ({r['method']}){sim}: {f['composed']:,} instructions composed, {f['kept']:,} kept, "
            f"{_count(f['sft_examples'], 'SFT example')}, {_count(f['preference_pairs'], 'preference pair')} in "
            f"{r['time']['wall_s']:.1f} s{_whole(r['time'])}{cost}\n  {hops}")


def _replayed(r: dict[str, Any]) -> bool:
    """Every answer of this run came from the cache: nothing was sent, online or in batches."""
    t = r["requests"]["total"]
    return t["sent"] == 0 and t["batch_sent"] == 0 and t["cached"] > 0


def _keep_timings(out: Path, r: dict[str, Any]) -> bool:
    """A rerun that replayed every answer says so (`replay`); its timings measure the cache, not the provider, so
    those of the run that sent the requests, from the report.json it replaces, are kept ("time", "stages" and
    timeline.png), with the replay's beside them ("time"."replay"). True when they were kept."""
    import orjson

    if not _replayed(r):
        return False
    r["replay"] = True
    # kept: the timings beside these are the run's that sent the requests (else this replay's own)
    mine = {**{k: r["time"][k] for k in ("wall_s", "diversity_s", "command_s")}, "kept": False}
    try:
        before = orjson.loads((out / "report.json").read_bytes())
        time_before, stages_before = dict(before["time"]), before["stages"]
        float(time_before["wall_s"])
        if isinstance(time_before.get("replay"), dict) and not time_before["replay"].get("kept"):
            raise ValueError("the report before was a replay's too")
    except (OSError, ValueError, KeyError, TypeError):
        r["time"]["replay"] = mine  # the run that sent the requests left no report: only the replay's timings
        return False
    time_before.pop("replay", None)
    r["time"] = {**time_before, "replay": {**mine, "kept": True}}
    r["stages"] = stages_before
    return True


def write_report(out: Path, result: dict[str, Any], rec: Any, div: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Write report.json, report.md and the plots into `out`; returns the report with its `headline`."""
    import orjson

    r = build_report(result, rec, div)
    kept = _keep_timings(out, r)
    plots = plot(out, r, result["stages"], timeline=not kept)
    r["plots"] = plots
    tmp = out / "report.json.partial"
    tmp.write_bytes(orjson.dumps(r, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    tmp.replace(out / "report.json")
    md = out / "report.md.partial"
    md.write_text(render_markdown(r, plots), encoding="utf-8")
    md.replace(out / "report.md")
    r["headline"] = headline(r)
    return r
