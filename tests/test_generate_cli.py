"""`tcia-async generate` as a user runs it: a subprocess against the simulator on a background thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tcia_async.sim import SimConfig, SimThread

SECRET = "sk-cli-SECRET-abcdef0123"


def write_input(path: Path, n: int, tag: str = "q", extra: list[bytes] | None = None) -> Path:
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "max_tokens": 8,
                                            "messages": [{"role": "user", "content": f"question {tag} {i}"}]}}) + b"\n")
        for line in extra or []:
            fh.write(line + b"\n")
    return path


def argv(inp: Path, out: Path, base: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "tcia_async", "generate", str(inp), "-o", str(out), "--base-url", base,
            "--summary-json", str(out) + ".summary.json", *more]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OPENAI_API_KEY"] = SECRET
    e.pop("OPENAI_BASE_URL", None)
    return e


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env(), timeout=timeout)


def results(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def wait_requests(sim: SimThread, n: int, timeout: float = 30) -> None:
    """Block until the simulator has seen `n` requests (event-driven on the sim's loop)."""
    sim.wait_requests(n, timeout)


def settled_ok(sim: SimThread, timeout: float = 30) -> int:
    """The simulator's `ok` once every request it received has ended: a client killed mid-request leaves
    handlers in their latency, and one may still answer (and count) before it sees the connection gone."""
    deadline = time.monotonic() + timeout
    while True:
        st = sim.stats()
        ended = sum(st["by_status"].values()) + st["faults"].get("client_gone", 0)
        if ended >= st["requests"]:
            return st["ok"]
        assert time.monotonic() < deadline, st
        time.sleep(0.01)


def assert_no_secret(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            assert SECRET.encode() not in p.read_bytes(), p


def test_results_bad_lines_duplicates_and_summary(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20, extra=[
        b"{not json",
        orjson.dumps({"custom_id": "q3", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}),
        orjson.dumps({"custom_id": "img", "url": "/v1/images/generations", "body": {}}),
        orjson.dumps({"body": {"model": "m"}}),
        b"",
        orjson.dumps({"custom_id": "emb", "url": "/v1/embeddings",
                      "body": {"model": "text-embedding-3-small", "input": "hi"}}),
    ])
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run(argv(inp, out, sim.base_url))
        assert p.returncode == 4, p.stderr  # finished, but some lines ended in an error
        assert "generate complete with errors" in p.stderr
        assert "4 of 25 lines ended in an error (bad_input 3, duplicate_custom_id 1)" in p.stderr
        # Each bad line is named on stderr too, with its file and line number.
        for line in (21, 22, 23, 24):
            assert f"in.jsonl:{line}:" in p.stderr
        res = results(out)
        assert len(res) == 25  # 20 requests + 5 non-blank extra lines, each exactly once
        errors = {r["error"]["line"]: r["error"] for r in res if r["error"]}
        assert errors[21]["code"] == "bad_input" and "in.jsonl:21" in errors[21]["message"]
        assert errors[22]["code"] == "duplicate_custom_id" and "line 4" in errors[22]["message"]
        assert "unsupported url" in errors[23]["message"]
        assert "custom_id" in errors[24]["message"]
        assert {r["custom_id"] for r in res if r["error"] is None} == {f"q{i}" for i in range(20)} | {"emb"}
        summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
        assert summary["status"] == "complete with errors" and summary["exit_code"] == 4
        assert summary["failed_by_code"] == {"bad_input": 3, "duplicate_custom_id": 1}
        assert summary["ok"] == 21 and summary["failed"] == 4 and summary["sent"] == 21
        assert sim.stats()["requests"] == 21
    assert_no_secret(out, Path(str(out) + ".cache.db"), Path(str(out) + ".cache.db-wal"),
                     tmp_path / "out.jsonl.summary.json")
    assert SECRET not in p.stderr and SECRET not in p.stdout


def test_a_bad_line_owns_its_custom_id(tmp_path):
    good = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(orjson.dumps({"custom_id": "a"}) + b"\n" + orjson.dumps({"custom_id": "a", "body": good}) + b"\n")
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        assert run(argv(inp, out, sim.base_url, "--quiet")).returncode == 4
        codes = sorted(r["error"]["code"] for r in results(out))
        assert codes == ["bad_input", "duplicate_custom_id"]  # never a bad line and an answer under one id
        assert sim.stats()["requests"] == 0


def test_repeated_bodies_are_separate_samples_and_replay_as_such(tmp_path):
    same = {"model": "gpt-4o-mini", "temperature": 1.0, "messages": [{"role": "user", "content": "a poem"}]}
    emb = {"model": "text-embedding-3-small", "input": "same text"}
    lines = [orjson.dumps({"custom_id": f"s{i}", "body": same}) for i in range(3)]
    lines += [orjson.dumps({"custom_id": f"e{i}", "url": "/v1/embeddings", "body": emb}) for i in range(2)]
    inp = write_input(tmp_path / "in.jsonl", 300, extra=lines[:1])  # repeats far apart: across input chunks
    with open(inp, "ab") as fh:
        fh.write(b"\n".join(lines[1:]) + b"\n")
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        assert run(argv(inp, out, sim.base_url, "--quiet")).returncode == 0
        stats = sim.stats()
        # Three lines with one chat body are three samples, as the Batch API would answer them; the two
        # identical embeddings lines (deterministic) share one call.
        assert stats["requests"] == 300 + 3 + 1
        assert {r["custom_id"] for r in results(out) if r["error"] is None} >= {"s0", "s1", "s2", "e0", "e1"}
        assert run(argv(inp, out, sim.base_url, "--quiet")).returncode == 0
        assert sim.stats()["requests"] == 300 + 3 + 1  # each sample has its own cache entry: nothing re-sent


def test_rerun_replays_and_editing_one_line_resends_only_it(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        assert run(argv(inp, out, sim.base_url, "--quiet")).returncode == 0
        first = {r["custom_id"]: r for r in results(out)}
        assert sim.stats()["requests"] == 30
        assert run(argv(inp, out, sim.base_url, "--quiet")).returncode == 0
        assert sim.stats()["requests"] == 30  # all from the cache
        assert {r["custom_id"]: r for r in results(out)} == first
        lines = inp.read_bytes().splitlines()
        edited = orjson.loads(lines[7])
        edited["body"]["messages"][0]["content"] = "an edited question"
        lines[7] = orjson.dumps(edited)
        inp.write_bytes(b"\n".join(lines) + b"\n")
        assert run(argv(inp, out, sim.base_url, "--quiet")).returncode == 0
        st = sim.stats()
        assert st["requests"] == 31 and st["duplicates"] == 0
        assert len(results(out)) == 30


def test_config_and_usage_errors_exit_2(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 1)
    out = tmp_path / "out.jsonl"
    p = run(argv(tmp_path / "missing.jsonl", out, "http://127.0.0.1:9/v1"))
    assert p.returncode == 2 and "no such file" in p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nconcurrency = 'many'\n")
    p = run(argv(inp, out, "http://127.0.0.1:9/v1", "--config", str(bad)))
    assert p.returncode == 2 and "bad.toml" in p.stderr
    p = run(argv(inp, out, "http://127.0.0.1:9/v1", "--rpm", "-5"))
    assert p.returncode == 2
    e = env()
    e.pop("OPENAI_API_KEY")
    p = subprocess.run(argv(inp, out, "https://api.example.com/v1"), capture_output=True, text=True, env=e)
    assert p.returncode == 2 and "OPENAI_API_KEY" in p.stderr


def test_config_file_limits_and_base_url_from_env(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out.jsonl"
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nconcurrency = 4\n[engine.limits]\nrps = 10\n"
                    "[engine.prices.'gpt-4o-mini']\ninput = 0.15\noutput = 0.6\n")
    with SimThread(SimConfig(rps=10, batch_delay_s=None)) as sim:
        e = env()
        e["OPENAI_BASE_URL"] = sim.base_url
        cmd = [sys.executable, "-m", "tcia_async", "generate", str(inp), "-o", str(out), "--config", str(conf),
               "--summary-json", str(tmp_path / "s.json")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=60)
        assert p.returncode == 0, p.stderr
        s = orjson.loads((tmp_path / "s.json").read_bytes())
        assert s["rate_limited"] == 0 and s["cost_usd"] > 0
        assert sim.stats()["by_status"] == {"200": 12}


def test_kill_9_then_rerun_completes_with_few_duplicates(tmp_path):
    n, c = 400, 16
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(latency_ms=20, batch_delay_s=None)) as sim:
        proc = subprocess.Popen(argv(inp, out, sim.base_url, "--concurrency", str(c), "--quiet"), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_requests(sim, n // 2)
        proc.kill()
        proc.wait()
        answered = settled_ok(sim)
        p = run(argv(inp, out, sim.base_url, "--concurrency", str(c), "--quiet"))
        assert p.returncode == 0, p.stderr
        res = results(out)
        assert sorted(r["custom_id"] for r in res) == sorted(f"q{i}" for i in range(n))
        assert all(r["error"] is None for r in res)
        st = sim.stats()
        assert st["unique"] == n
        summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
        # Exactly the answers that never reached the cache were paid twice: at most those on the wire (c) and those
        # answered but still waiting for the cache's next batch (max(8, c // 4), engine/core.py). A loaded machine
        # reaches that sum: the answers of a whole round can be waiting when the kill comes.
        assert st["duplicates"] == answered - summary["cached"]
        assert st["duplicates"] <= c + max(8, c // 4)


def test_ctrl_c_drains_then_rerun_completes(tmp_path):
    n, c = 300, 8
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(latency_ms=100, batch_delay_s=None)) as sim:
        proc = subprocess.Popen(argv(inp, out, sim.base_url, "--concurrency", str(c)), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_requests(sim, 3 * c)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "rerun the same command" in err
        assert not out.exists()  # the results file is written only by a run that finishes
        partial = results(tmp_path / "out.jsonl.partial")
        assert 0 < len(partial) < n and all(r["error"] is None for r in partial)
        # Drained, not abandoned: everything the sim answered has its result, so nothing is paid twice.
        assert len(partial) == sim.stats()["ok"]
        p = run(argv(inp, out, sim.base_url, "--concurrency", "64", "--quiet"))
        assert p.returncode == 0, p.stderr
        assert sorted(r["custom_id"] for r in results(out)) == sorted(f"q{i}" for i in range(n))
        assert sim.stats()["duplicates"] == 0


def test_second_ctrl_c_exits_at_once_and_cache_is_intact(tmp_path):
    n, c = 100, 4
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    # About a third of the requests hang for a minute: some are answered, then every slot is stuck, and only a
    # second Ctrl-C can end the run quickly.
    with SimThread(SimConfig(rate_hang=0.3, hang_s=60, batch_delay_s=None)) as sim:
        port = sim.port
        proc = subprocess.Popen(argv(inp, out, sim.base_url, "--concurrency", str(c), "--grace", "60"), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_requests(sim, c + 2)  # a 5th and 6th request mean at least two were answered
        proc.send_signal(signal.SIGINT)
        proc.stderr.readline()  # "interrupted: no new requests ..." once the first one is handled
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 130, err
    answered = {r["custom_id"] for r in results(tmp_path / "out.jsonl.partial") if r["error"] is None}
    assert len(answered) >= 2
    # The same provider again (same address: a cache answers only for the server that gave the answers).
    with SimThread(SimConfig(port=port, batch_delay_s=None)) as sim:
        p = run(argv(inp, out, sim.base_url, "--quiet"))
        assert p.returncode == 0, p.stderr
        assert len(results(out)) == n
        # Every answer the interrupted run had written out was in its cache: none is paid for again.
        summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
        assert summary["cached"] == len(answered)
        assert sim.stats()["requests"] == n - len(answered)


def test_quota_stops_with_exit_3_and_rerun_continues(tmp_path):
    n = 40
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(quota_after=15, batch_delay_s=None)) as sim:
        port = sim.port
        p = run(argv(inp, out, sim.base_url, "--concurrency", "1"))
        assert p.returncode == 3, p.stderr
        assert "quota" in p.stderr and "rerun the same command" in p.stderr
        assert len(results(tmp_path / "out.jsonl.partial")) == 15 and not out.exists()
        summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
        assert summary["status"] == "stopped" and summary["exit_code"] == 3
    with SimThread(SimConfig(port=port, batch_delay_s=None)) as sim:  # the same provider, "credit added"
        p = run(argv(inp, out, sim.base_url, "--quiet"))
        assert p.returncode == 0, p.stderr
        assert sorted(r["custom_id"] for r in results(out)) == sorted(f"q{i}" for i in range(n))
        assert sim.stats()["requests"] == n - 15


def test_wrong_key_stops_with_exit_3_and_key_is_not_printed(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(api_key="sk-the-right-one", batch_delay_s=None)) as sim:
        p = run(argv(inp, out, sim.base_url))
        assert p.returncode == 3
        assert "API key" in p.stderr and SECRET not in p.stderr
    assert_no_secret(out, tmp_path / "out.jsonl.summary.json", Path(str(out) + ".cache.db"))


def test_a_named_pipe_as_input_is_read_once(tmp_path):
    # A pipe can be read only once: the run reads it, and the progress display does not count its lines (a
    # second reader would take lines from the run, or wait for a writer forever). Batch mode, which reads
    # INPUT twice, refuses a pipe up front.
    import threading

    src = write_input(tmp_path / "src.jsonl", 30)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "wb") as fh:  # blocks until the command opens the pipe for reading
            fh.write(src.read_bytes())

    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        p = run(argv(fifo, tmp_path / "o.jsonl", sim.base_url), timeout=60)
        t.join(10)
        assert p.returncode == 0, p.stderr
        assert sorted(r["custom_id"] for r in results(tmp_path / "o.jsonl")) == sorted(f"q{i}" for i in range(30))
        assert sim.stats()["requests"] == 30
        p = run(argv(fifo, tmp_path / "b.jsonl", sim.base_url, "--mode", "batch"), timeout=60)
        assert p.returncode == 2 and "must be a regular file" in p.stderr
