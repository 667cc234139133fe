"""The report's measures on known inputs, and `tcia-async compare`."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from tcia_async.report import diversity


def brute_force(v: np.ndarray) -> float:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return float(np.mean([1.0 - u[i] @ u[j] for i, j in combinations(range(len(u)), 2)]))


def test_diversity_known_answers():
    assert diversity(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)  # orthogonal: 1 - 0
    assert diversity(np.array([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])) == pytest.approx(0.0)  # one direction
    assert diversity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)  # opposite
    assert diversity(np.array([[1.0, 0.0]])) is None  # no pair
    rng = np.random.default_rng(4)
    v = rng.normal(size=(60, 16))
    assert diversity(v) == pytest.approx(brute_force(v), abs=1e-9)  # exact over all pairs, no sampling


def _report(method: str, model: str, div: list[float], on_task: list[float]) -> dict:
    hops = [{"hop": i + 1, "diversity": d, "on_task_ratio": o} for i, (d, o) in enumerate(zip(div, on_task))]
    return {"method": method, "simulated": True, "embedding_model": model, "per_hop": hops,
            "funnel": {"composed": 10, "kept": 8, "sft_examples": 16, "preference_pairs": 3},
            "answers": {"judge_scores": {"helpfulness": {"4": 2, "5": 2}}},
            "cost": {"per_1000_sft_examples_usd": 1.5}}


def _write(run: Path, report: dict) -> Path:
    run.mkdir()
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_compare_puts_runs_side_by_side(tmp_path):
    a = _write(tmp_path / "a", _report("tcia", "local", [0.84, 0.81, 0.79], [1.0, 1.0, 1.0]))
    b = _write(tmp_path / "b", _report("evol", "local", [0.80, 0.72, 0.68], [0.8, 0.6, 0.5]))
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, "-m", "tcia_async", "compare", str(a), str(b), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    c = json.loads((out / "compare.json").read_text())
    assert c["diversity_compared"] is True
    assert [r["diversity"]["3"] for r in c["runs"]] == [0.79, 0.68]
    assert [r["on_task_ratio"]["2"] for r in c["runs"]] == [1.0, 0.6]
    assert c["runs"][0]["judge_means"]["helpfulness"] == 4.5 and c["runs"][1]["kept_share"] == 0.8
    md = (out / "compare.md").read_text()
    assert "| diversity, hop 1 (paper: tcia 0.844, evol 0.798) | 0.840 | 0.800 |" in md
    assert (out / "compare.png").stat().st_size > 0
    # Its own files are replaced by a second compare; a compare.md of the user's is refused untouched.
    p = subprocess.run([sys.executable, "-m", "tcia_async", "compare", str(a), str(b), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "compare.md").write_text("my notes\n")
    p = subprocess.run([sys.executable, "-m", "tcia_async", "compare", str(a), str(b), "--out", str(mine)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "writing would replace it" in p.stderr, p.stderr
    assert (mine / "compare.md").read_text() == "my notes\n" and sorted(x.name for x in mine.iterdir()) == ["compare.md"]


def test_compare_refuses_diversity_of_different_embedding_models(tmp_path):
    a = _write(tmp_path / "a", _report("tcia", "local", [0.8], [1.0]))
    b = _write(tmp_path / "b", _report("evol", "text-embedding-3-large", [0.7], [0.6]))
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, "-m", "tcia_async", "compare", str(a), str(b), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "diversity is not compared" in p.stderr and "text-embedding-3-large" in p.stderr
    c = json.loads((out / "compare.json").read_text())
    assert c["diversity_compared"] is False and all(r["diversity"] is None for r in c["runs"])
    assert "diversity, hop" not in (out / "compare.md").read_text()
    assert c["runs"][1]["on_task_ratio"]["1"] == 0.6  # the other rows are still compared


def test_compare_names_what_is_wrong(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tcia_async", "compare", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no report.json" in p.stderr
