"""`tcia-async generate --mode batch` and `tcia-async batches` as a user runs them: subprocesses against the
simulator on a background thread."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import orjson

from tcia_async.cli import main
from tcia_async.engine.batch import read_state
from tcia_async.sim import SimConfig, SimThread
from test_generate_cli import argv, env, results, run, wait_requests, write_input
from test_taskdb_flow import write_corpus

FAST = "[batch]\npoll_interval = 0.02\npoll_max = 0.05\n"


def config(tmp_path: Path, text: str = FAST) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def batch_argv(inp: Path, out: Path, sim: SimThread, cfg: Path, *more: str) -> list[str]:
    return argv(inp, out, sim.base_url, "--mode", "batch", "--config", str(cfg), *more)


def batches_cmd(*args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "tcia_async", "batches", *map(str, args)], capture_output=True,
                          text=True, env=env(), timeout=60)


def wait_created(sim: SimThread, n: int, timeout: float = 30) -> None:
    """Block until the simulator holds `n` batches (woken by its own events)."""
    fut = asyncio.run_coroutine_threadsafe(sim.sim.handlers.batches.wait_created(n), sim._loop)
    fut.result(timeout)


def n_batches(sim: SimThread) -> int:
    return sim._call(lambda: len(sim.sim.handlers.batches.batches))


def comparable(line: dict) -> dict:
    """A result line without what differs between any two answers of the provider (its ids and clock)."""
    line = dict(line)
    resp = line.get("response")
    if resp:
        body = {k: v for k, v in resp["body"].items() if k != "created"}
        line["response"] = {"status_code": resp["status_code"], "body": body}
    return line


def chat(cid: str, text: str, **kw) -> bytes:
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-4o-mini", "max_tokens": 8, **kw,
                                  "messages": [{"role": "user", "content": text}]}})


def test_batch_results_are_the_online_results(tmp_path):
    lines = [chat(f"c{i}", f"question {i}") for i in range(6)] + [
        chat("again", "question 1"),  # the same body as c1: a second sample
        orjson.dumps({"custom_id": "emb", "url": "/v1/embeddings",
                      "body": {"model": "text-embedding-3-small", "input": "one text"}}),
        chat("bad400", "x", max_tokens=0),  # the provider answers 400
        b"{not json",
        chat("c0", "a repeated custom_id"),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    with SimThread(SimConfig(batch_delay_s=0.02)) as sim:
        online = run(argv(inp, tmp_path / "online.jsonl", sim.base_url, "--quiet"))
        sent_online = sim.stats()["ok"]
        batch = run(batch_argv(inp, tmp_path / "batch.jsonl", sim, config(tmp_path)))
        assert sim.stats()["ok"] == sent_online  # batch mode sent nothing online
    assert online.returncode == batch.returncode == 4, batch.stderr
    # Results come in completion order: compare them by line (their `id`).
    a, b = (sorted(map(comparable, results(tmp_path / f"{m}.jsonl")), key=lambda x: x["id"])
            for m in ("online", "batch"))
    assert len(a) == len(lines) and a == b
    assert {x["custom_id"]: (x["error"] or {}).get("code") for x in b if x["error"]} == {
        "bad400": "bad_request", None: "bad_input", "c0": "duplicate_custom_id"}
    summary = orjson.loads((tmp_path / "batch.jsonl.summary.json").read_bytes())
    assert summary["mode"] == "batch" and summary["batch"]["answered"] == 8 and summary["batch"]["unanswered"] == 1
    assert "batch b000001" in batch.stderr and "completed" in batch.stderr


def test_kill_9_while_polling_then_rerun_reattaches_and_pays_each_line_once(tmp_path):
    n = 30
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    cfg = config(tmp_path)
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        proc = subprocess.Popen(batch_argv(inp, out, sim, cfg, "--quiet"), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_requests(sim, 3)  # upload, create, a first status check: the batch id is on disk
        proc.kill()
        proc.wait()
        (rec,) = read_state(tmp_path / "out.jsonl.batches")
        assert rec.batch_id and not rec.settled
        sim.advance_batches()
        sim.advance_batches()
        p = run(batch_argv(inp, out, sim, cfg))
        assert p.returncode == 0, p.stderr
        assert sorted(r["custom_id"] for r in results(out)) == sorted(f"q{i}" for i in range(n))
        st = sim.stats()
        assert st["batch"] == {"lines_ok": n, "lines_failed": 0} and st["duplicates"] == 0 and st["ok"] == 0
        assert n_batches(sim) == 1  # reattached: nothing uploaded twice
        summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
        assert summary["batch"]["reattached"] == 1 and summary["batch"]["uploads"] == 0


def test_ctrl_c_while_waiting_exits_130_and_the_rerun_collects_the_batch(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    cfg = config(tmp_path)
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        proc = subprocess.Popen(batch_argv(inp, out, sim, cfg, "--quiet"), env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_requests(sim, 3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "rerun the same command" in err and not out.exists()
        sim.advance_batches()
        sim.advance_batches()
        p = run(batch_argv(inp, out, sim, cfg, "--quiet"))
        assert p.returncode == 0, p.stderr
        assert len(results(out)) == 10 and n_batches(sim) == 1 and sim.stats()["duplicates"] == 0


def test_quota_at_upload_exits_3(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    with SimThread(SimConfig(batch_delay_s=None, upload_quota_after=0)) as sim:
        p = run(batch_argv(inp, out, sim, config(tmp_path)))
        assert p.returncode == 3, p.stderr
        assert "insufficient_quota" in p.stderr and "rerun the same command" in p.stderr
        assert not out.exists() and n_batches(sim) == 0
    summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
    assert summary["status"] == "stopped" and summary["exit_code"] == 3


def test_batches_lists_and_cancels_and_a_rerun_resubmits_the_cancelled_lines(tmp_path):
    n = 8
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    state = tmp_path / "out.jsonl.batches"
    cfg = config(tmp_path)
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        proc = subprocess.Popen(batch_argv(inp, out, sim, cfg, "--quiet"), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_requests(sim, 3)
        proc.kill()
        proc.wait()
        listed = batches_cmd(state)
        assert listed.returncode == 0, listed.stderr
        assert "b000001" in listed.stdout and "validating" in listed.stdout and "0/8" in listed.stdout
        cancelled = batches_cmd(state, "--cancel")
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        rerun = subprocess.Popen(batch_argv(inp, out, sim, cfg, "--quiet"), env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        wait_created(sim, 2)  # the cancelled lines, in a new batch
        sim.advance_batches()
        sim.advance_batches()
        _, err = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, err
        assert len(results(out)) == n and sim.stats()["batch"]["lines_ok"] == n
    assert [r.round for r in read_state(state)] == [0, 1]
    assert "settled" in batches_cmd(state).stdout


def test_batch_mode_usage_errors_exit_2(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    base = "http://127.0.0.1:9/v1"
    checks = [
        (["--mode", "batch", "--no-cache"], "needs the cache"),
        (["--mode", "batch", "--poll-interval", "0"], "--poll-interval = 0"),
        (["--mode", "batch", "--batch-dir", str(inp)], "same path"),
        (["--poll-interval", "5"], "for --mode batch"),
    ]
    for flags, message in checks:
        p = run(argv(inp, out, base, *flags))
        assert p.returncode == 2 and message in p.stderr, (flags, p.stderr)
    assert not out.exists() and not (tmp_path / "out.jsonl.batches").exists()
    p = batches_cmd(tmp_path)
    assert p.returncode == 2 and "not a batch state directory" in p.stderr


def test_db_build_in_batch_mode_builds_the_same_database(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    cfg = config(tmp_path)
    with SimThread(SimConfig(embedding_dim=96, batch_delay_s=0.02, record_bodies=1000)) as sim:
        def build(out: Path, *extra: str) -> int:
            return main(["db", "build", str(corpus), "--out", str(out), "--base-url", sim.base_url, "--model",
                         "gpt-test", "--embedding-model", "emb-test", "--eps", "0.3", "--config", str(cfg), *extra])

        assert build(tmp_path / "batch", "--mode", "batch") == 4  # the corpus has 2 bad lines
        assert "batch b000001" in capsys.readouterr().err
        assert sim.stats()["batch"]["lines_ok"] == 7
        assert not any("messages" in b for b in sim.bodies())  # no decomposition went online
        assert build(tmp_path / "online", "--quiet") == 4
    (rec,) = read_state(tmp_path / "batch" / "batches")
    assert rec.settled and rec.lines == 7
    lines = {m: sorted((tmp_path / m / "records.jsonl").read_text().splitlines()) for m in ("batch", "online")}
    assert len(lines["batch"]) == 7 and lines["batch"] == lines["online"]


def test_batches_names_a_state_file_it_cannot_read(tmp_path, monkeypatch, capsys):
    from tcia_async.engine import batch

    state = tmp_path / "state"
    state.mkdir()
    (state / batch.STATE_FILE).write_text("")

    def unreadable(state_dir):
        raise PermissionError(13, "Permission denied", str(Path(state_dir) / batch.STATE_FILE))

    monkeypatch.setattr(batch, "read_state", unreadable)  # as root, a chmod 000 file is still read
    assert main(["batches", str(state)]) == 2
    assert capsys.readouterr().err.strip() == f"tcia-async batches: {state / batch.STATE_FILE}: Permission denied"


def test_db_build_names_a_file_it_cannot_read(tmp_path, monkeypatch, capsys):
    from tcia_async.flows import taskdb

    corpus = write_corpus(tmp_path / "corpus.jsonl")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(taskdb, "corpus_hash", unreadable)
    assert main(["db", "build", str(corpus), "--out", str(tmp_path / "db"), "--base-url", "http://127.0.0.1:9/v1",
                 "--embedding-model", "hashed", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"tcia-async db build: {corpus}: Permission denied")


def test_batches_on_a_runs_folder_lists_its_stage_state_dirs_and_a_missing_path_is_named(tmp_path, capsys):
    from tcia_async.engine import batch

    run_dir = tmp_path / "run"
    for stage in ("compose", "judge"):
        (run_dir / "batches" / stage).mkdir(parents=True)
        (run_dir / "batches" / stage / batch.STATE_FILE).write_text("")
    for given in (run_dir / "batches", run_dir):
        assert main(["batches", str(given)]) == 2
        err = capsys.readouterr().err
        assert f"{given}: not a batch state directory (no {batch.STATE_FILE})" in err
        assert f"{run_dir / 'batches' / 'compose'}, {run_dir / 'batches' / 'judge'}" in err, err
    assert main(["batches", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"tcia-async batches: {tmp_path / 'nope'}: does not exist"
    (tmp_path / "empty").mkdir()
    assert main(["batches", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"empty: not a batch state directory (no {batch.STATE_FILE})")
