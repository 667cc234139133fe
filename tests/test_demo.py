"""`tcia-async demo`: the user's first command must work offline and show a resume that pays nothing twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_offline_and_resumes_without_repeating_paid_calls(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "tcia_async", "demo", "--out", str(out), "--requests", "300", "--latency-ms", "5",
         "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ids = [r["custom_id"] for r in results]
    assert len(ids) == 330 and len(set(ids)) == 330  # 300 chat + 30 embeddings lines, each exactly once
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    s2 = json.loads((out / "summary-2.json").read_text())
    s3 = json.loads((out / "summary-3.json").read_text())
    assert s2["cached"] == 165  # the half answered before the "crash" came from the cache
    assert s3["sent"] == 0 and s3["cached"] == 330
    assert "0 paid twice" in proc.stdout
