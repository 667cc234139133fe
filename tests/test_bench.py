"""The benchmark harness (`./bench.sh`, benchmarks/bench.py) runs end to end and writes what it promises.

Sizes are tiny here: the figures mean nothing; the test checks the plumbing (simulator as a separate process,
client subprocesses, summary keys, report, skips with reasons), never a speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

REQUIRED = {
    "throughput": ["engine_rps", "floor_rps", "openai_sdk_rps", "ratio_floor", "ratio_sdk", "engine_cpu_us"],
    "latency_bound": ["efficiency"],
    "rate_limited": ["time_ratio", "share_429"],
    "resume": ["duplicates", "in_flight_at_kill", "replay_rps"],
    "memory": ["n", "peak_rss_mb"],
    "hnsw": ["recall_at_10", "qps", "build_s"],
    "pipeline": ["overlap_ratio"],
}


def _run_bench(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the harness to its end. If the test is cut short (our timeout, pytest-timeout, Ctrl-C), end it with
    SIGTERM, which it turns into its clean-up (simulator and clients ended, scratch removed); a SIGKILL, as
    subprocess.run sends, would leave its children running."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable})
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.timeout(300)  # the whole tiny profile; pyproject's 120 s default is too short on a slow machine
def test_bench_tiny_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _run_bench([str(ROOT / "bench.sh"), "--tiny", "--out", str(out)], timeout=270)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for scenario, keys in REQUIRED.items():
        assert scenario in summary, scenario
        for key in keys:
            assert key in summary[scenario], f"{scenario}.{key} missing"
    m = summary["machine"]
    assert m["cores"] and m["python"] and m["versions"]["aiohttp"]

    # The baselines need nothing but the simulator, so they are always measured, and fully answered.
    t = summary["throughput"]
    assert t["floor_rps"] > 0 and t["openai_sdk_rps"] > 0
    assert t["clients"]["raw"]["ok"] == t["n"]
    assert summary["latency_bound"]["floor_efficiency"] > 0
    assert summary["pipeline"]["overlap_ratio"] > 0 and summary["pipeline"]["pipeline_requests"] > 0
    assert 0 < summary["hnsw"]["recall_at_10"] <= 1 and summary["hnsw"]["qps"] > 0

    # The engine's scenarios all ran, every request answered.
    assert t["engine_rps"] > 0 and t["ratio_floor"] > 0 and t["ratio_sdk"] > 0
    assert t["clients"]["engine"]["ok"] == t["n"]
    assert summary["latency_bound"]["efficiency"] > 0
    assert summary["rate_limited"]["completed_share"] is not None
    r = summary["resume"]
    assert r["rerun_complete"] is True, r
    assert r["duplicates"] is not None and r["in_flight_at_kill"] is not None
    assert summary["memory"]["peak_rss_mb"] > 0

    report = (out / "report.md").read_text()
    assert "| scenario | figure | value | target | status |" in report
    assert "engine req/s ÷ raw aiohttp floor" in report
    rows = {(r["scenario"], r["key"]): r for r in summary["targets"]}
    assert rows[("throughput", "ratio_floor")]["target"] == ">= 0.65"
    for png in summary["plots"]["files"]:
        assert (out / png).stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib" in summary["plots"]["note"]


def test_only_selects_scenarios_and_rejects_unknown_ones(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--tiny", "--only", "pipeline", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenarios_run"] == ["pipeline"]
    assert summary["throughput"]["skipped"] == "not selected (--only)"
    assert summary["throughput"]["engine_rps"] is None
    bad = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--only", "warp", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "warp" in bad.stderr


def test_ideal_time_under_rolling_windows() -> None:
    from common import SimSettings
    from rate_limited import ideal_seconds

    # 1,500 requests at 100/s: 100 at once, then 100 per window for 14 more windows, plus one latency.
    ideal, plain = ideal_seconds(1500, SimSettings(latency_ms=200, rps=100), None)
    assert ideal == pytest.approx(14.2) and plain == pytest.approx(15.0)
    # RPM binds unless the tokens do: 12,000 requests at 6,000 RPM / 1M TPM with 30 tokens each.
    ideal, _ = ideal_seconds(12_000, SimSettings(latency_ms=200, rpm=6000, tpm=1_000_000), 30)
    assert ideal == pytest.approx(60.2)
    ideal, _ = ideal_seconds(12_000, SimSettings(latency_ms=0, rpm=6000, tpm=100_000), 30)
    assert ideal == pytest.approx(3 * 60.0)  # 360k tokens at 100k per minute: 3 more windows
    # With 256 slots held 200 ms each, a window's 6,000 requests take 24 rounds (the last sent at 4.6 s), and the
    # second window's requests follow the first's one period later: the last is sent at 64.6 s.
    ideal, _ = ideal_seconds(12_000, SimSettings(latency_ms=200, rpm=6000, tpm=1_000_000), 30, 256)
    assert ideal == pytest.approx(64.8)
    # Concurrency alone: 1,000 requests, 100 slots, 500 ms each, no limit: 10 rounds.
    ideal, _ = ideal_seconds(1000, SimSettings(latency_ms=500), None, 100)
    assert ideal == pytest.approx(5.0)


def test_targets_mark_pass_short_and_unmeasured() -> None:
    import bench_report

    summary = {"throughput": {"ratio_floor": 0.8, "ratio_sdk": 12.0}, "resume": {"duplicates": 300,
               "concurrency": 256}, "hnsw": {"skipped": "benchmarks/hnsw.py is not there yet"}}
    bench_report.fill_missing(summary, [])
    rows = {(r["scenario"], r["key"]): r["status"] for r in bench_report.evaluate(summary)}
    assert rows[("throughput", "ratio_floor")] == "pass"
    assert rows[("throughput", "ratio_sdk")] == "short"
    assert rows[("resume", "duplicates")] == "short"
    assert rows[("hnsw", "recall_at_10")] == "not measured"
    reasons = {(r["scenario"], r["key"]): r["reason"] for r in bench_report.evaluate(summary)}
    assert reasons[("hnsw", "recall_at_10")] == "benchmarks/hnsw.py is not there yet"


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process, None when there is none (a zombie counts as none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]), int(fields[19]))


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of `root` (start time tells a reused pid apart)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
            procs[int(entry.name)] = st
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (_, ppid, start) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from Linux /proc")
@pytest.mark.timeout(90)
def test_sigterm_leaves_no_child_process_or_scratch_behind(tmp_path: Path) -> None:
    # `resume` runs a simulator and a `tcia-async generate` child, each in a session of its own: a signal to the
    # harness reaches neither unless the harness ends them itself.
    proc = subprocess.Popen([sys.executable, str(BENCH / "bench.py"), "--tiny", "--only", "resume", "--out",
                             str(tmp_path / "results")], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, cwd=ROOT)
    children: dict[int, int] = {}
    try:
        scratch = sim_pid = gen_pid = None
        assert proc.stderr is not None
        for line in proc.stderr:  # its progress lines; the generate line comes right after that child starts
            if "scratch " in line and line.startswith("bench:"):
                scratch = Path(line.rsplit("scratch ", 1)[1].strip())
            elif line.strip().startswith("simulator pid "):
                sim_pid = int(line.split()[2])
            elif line.strip().startswith("generate pid "):
                gen_pid = int(line.split()[2])
                break
        assert scratch is not None and sim_pid is not None and gen_pid is not None, "progress lines not seen"
        children = _descendants(proc.pid)
        assert sim_pid in children and gen_pid in children, children  # both running when the signal lands
        assert scratch.is_dir()
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM, rest[-2000:]
        left = [pid for pid, start in children.items() if (st := _proc_stat(pid)) is not None and st[2] == start]
        assert left == [], f"still running after SIGTERM: {left}"
        assert not scratch.exists()
    finally:  # whatever happened above, this test leaves nothing running either
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, start in children.items():
            if (st := _proc_stat(pid)) is not None and st[2] == start:
                os.kill(pid, signal.SIGKILL)
