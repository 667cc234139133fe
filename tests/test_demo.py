"""`tcia-async demo`: the user's first command must work offline, run the whole pipeline, and show a resume that
pays nothing twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_pipeline_offline_and_resumes_without_repeating_paid_calls(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "tcia_async", "demo", "--out", str(out), "--sets", "12", "--latency-ms", "20",
         "--quiet"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run 1 ended with exit code 130" in proc.stderr  # a real Ctrl-C part way
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["simulated"] is True and report["funnel"]["composed"] == 3 * 12
    sft = (out / "run" / "sft.jsonl").read_text().splitlines()
    assert len(sft) == report["funnel"]["sft_examples"] > 0
    assert "0 paid twice" in proc.stdout and "run 3 sent 0" in proc.stdout


def test_demo_refuses_an_out_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "tcia_async", "demo", "--out", str(f)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "not a directory" in proc.stderr and f.read_text() == "mine"


def test_demo_refuses_a_folder_of_someone_elses_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "tcia_async", "demo", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "files of its own (notes.txt)" in proc.stderr, proc.stderr
    assert [x.name for x in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_refuses_a_folder_whose_demo_toml_is_the_users(tmp_path):
    """A file named like the demo's settings is not enough to make a folder the demo's: its run/ would be
    deleted and demo.toml replaced."""
    (tmp_path / "demo.toml").write_text("precious = true\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "tcia_async", "demo", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "files of its own" in proc.stderr, proc.stderr
    assert (tmp_path / "demo.toml").read_text() == "precious = true\n"
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
