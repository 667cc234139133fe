"""`tcia-async compare RUNDIR... --out DIR`: several runs side by side (e.g. TCIA against Evol-Instruct on the same
seeds): diversity and on-task ratio per hop, kept share, judge means, cost per 1,000 SFT examples, with the
paper's figures as reference lines. Written as compare.md, compare.json and compare.png.

Diversity is only comparable between runs embedded with the same model: when the models differ, the diversity
rows are left out and the reason is said (the other rows are still compared).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from tcia_async.flows import EXIT_OK, EXIT_USAGE
from tcia_async.flows.common import UsageError, check_paths, check_replaceable, json_with, say, starts_with

TITLE = "# Runs compared"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUNDIR", help="run directories of `tcia-async run` (with report.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="where compare.md, compare.json and compare.png go")
    p.add_argument("--name", action="append", default=None, metavar="NAME",
                   help="a label per run, in order (default: the directory name and its method)")


def _err(msg: str) -> None:
    say("compare", msg)


def load(run: str) -> dict[str, Any]:
    path = Path(run) / "report.json"
    if not path.is_file():
        raise UsageError(f"{run}: no report.json (is it the directory of a finished `tcia-async run`?)")
    try:
        report = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    for key in ("method", "per_hop", "funnel", "answers", "cost", "embedding_model"):
        if key not in report:
            raise UsageError(f"{path}: not a run report (no {key!r})")
    return report


def _mean(dist: dict[str, int]) -> float | None:
    n = sum(dist.values())
    return sum(int(k) * v for k, v in dist.items()) / n if n else None


def compare(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    models = {r["embedding_model"] for r in reports}
    same_model = len(models) == 1
    hops = sorted({h["hop"] for r in reports for h in r["per_hop"]})
    runs = []
    for name, r in zip(names, reports):
        f = r["funnel"]
        by_hop = {h["hop"]: h for h in r["per_hop"]}
        runs.append({
            "name": name,
            "method": r["method"],
            "simulated": r.get("simulated"),
            "embedding_model": r["embedding_model"],
            "diversity": {h: (by_hop[h]["diversity"] if h in by_hop else None) for h in hops} if same_model else None,
            "on_task_ratio": {h: (by_hop[h]["on_task_ratio"] if h in by_hop else None) for h in hops},
            "composed": f["composed"],
            "kept": f["kept"],
            "kept_share": round(f["kept"] / f["composed"], 4) if f["composed"] else None,
            "sft_examples": f["sft_examples"],
            "preference_pairs": f["preference_pairs"],
            "judge_means": {dim: _mean(d) for dim, d in r["answers"]["judge_scores"].items()},
            "cost_per_1000_sft_usd": r["cost"].get("per_1000_sft_examples_usd"),
        })
    return {"runs": runs, "hops": hops, "diversity_compared": same_model,
            "diversity_note": None if same_model else
            f"diversity is not compared: the runs were embedded with different models ({', '.join(sorted(models))}); "
            "distances of different models are not on one scale. Re-run with one embedding model to compare it."}


def _f(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f} %" if pct else (f"{x:.3f}" if isinstance(x, float) else f"{x:,}")


def render(c: dict[str, Any]) -> str:
    from tcia_async.report import PAPER, PAPER_NOTE

    runs = c["runs"]
    head = "| | " + " | ".join(r["name"] for r in runs) + " |"
    sep = "|---|" + "---|" * len(runs)
    lines = [TITLE, "", head, sep]
    lines.append("| method | " + " | ".join(r["method"] + (" (simulated)" if r["simulated"] else "") for r in runs) + " |")
    if c["diversity_compared"]:
        for h in c["hops"]:
            paper = ", ".join(f"{m} {_f(PAPER[m]['diversity'].get(h))}" for m in ("tcia", "evol"))
            lines.append(f"| diversity, hop {h} (paper: {paper}) | "
                         + " | ".join(_f(r["diversity"][h]) for r in runs) + " |")
    for h in c["hops"]:
        lines.append(f"| on-task ratio, hop {h} | " + " | ".join(_f(r["on_task_ratio"][h], True) for r in runs) + " |")
    for key, label in (("composed", "instructions composed"), ("kept", "kept"), ("sft_examples", "SFT examples"),
                       ("preference_pairs", "preference pairs")):
        lines.append(f"| {label} | " + " | ".join(_f(r[key]) for r in runs) + " |")
    lines.append("| kept share | " + " | ".join(_f(r["kept_share"], True) for r in runs) + " |")
    dims = sorted({d for r in runs for d in r["judge_means"]})
    for d in dims:
        lines.append(f"| judge mean, {d} | " + " | ".join(_f(r["judge_means"].get(d)) for r in runs) + " |")
    lines.append("| cost per 1,000 SFT examples (USD) | " + " | ".join(_f(r["cost_per_1000_sft_usd"]) for r in runs)
                 + " |")
    lines += ["", f"Embedding models: {', '.join(sorted({r['embedding_model'] for r in runs}))}. {PAPER_NOTE}."]
    if c["diversity_note"]:
        lines += ["", c["diversity_note"]]
    return "\n".join(lines) + "\n"


def plot(out: Path, c: dict[str, Any]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from tcia_async.report import plot_per_hop

    hops = c["hops"]
    runs = [(r["name"], [r["diversity"][h] for h in hops] if c["diversity_compared"] else None,
             [r["on_task_ratio"][h] for h in hops]) for r in c["runs"]]
    plot_per_hop(plt, out / "compare.png", hops, runs,
                 "" if c["diversity_compared"] else " (not comparable: see compare.md)")
    return "compare.png"


def run_cli(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        if args.name and len(args.name) != len(args.runs):
            raise UsageError(f"--name given {len(args.name)} times for {len(args.runs)} runs")
        reports = [load(r) for r in args.runs]
        check_paths({}, {"--out/compare.md": out / "compare.md", "--out/compare.json": out / "compare.json"})
        # Only an earlier compare's files are replaced: compare.md by its title, compare.json by its keys, and
        # compare.png when the compare.json beside it is ours.
        ours_json = json_with("runs", "hops", "diversity_compared")
        check_replaceable(out / "compare.md", "--out", starts_with(TITLE.encode()),
                          "a comparison of tcia-async compare")
        check_replaceable(out / "compare.json", "--out", ours_json, "a comparison of tcia-async compare")
        check_replaceable(out / "compare.png", "--out", lambda _f: ours_json(out / "compare.json"),
                          "a plot of tcia-async compare")
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    names = args.name or [f"{Path(r).resolve().name} ({rep['method']})" for r, rep in zip(args.runs, reports)]
    c = compare(reports, names)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(out, c)
    md = render(c) + (f"\n![runs compared]({png})\n" if png else "")
    (out / "compare.md").write_text(md, encoding="utf-8")
    (out / "compare.json").write_bytes(orjson.dumps(c, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    if c["diversity_note"]:
        _err(c["diversity_note"])
    print(md)
    return EXIT_OK
