"""`tcia-async generate` pointed at anything: no file of the user's lost, nothing paid twice, no wrong answer
replayed, honest exit codes, a message instead of a traceback, and odd input and answers handled."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from oddserver import OddServer
from tcia_async.sim import SimConfig, SimThread


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("OPENAI_BASE_URL", None)
    e["OPENAI_API_KEY"] = "sk-test"
    return e


def gen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcia_async", "generate", *map(str, args)], capture_output=True,
                          text=True, env=env(), timeout=timeout)


def chat_line(cid, text: str, model: str = "gpt-4o-mini") -> bytes:
    return orjson.dumps({"custom_id": cid, "body": {"model": model, "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": text}]}})


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def results(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- files --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink"])
def test_an_output_that_is_the_input_is_refused_and_nothing_is_touched(tmp_path, spelling):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    before = inp.read_bytes()
    other = {"same": inp, "dot": Path(f"{tmp_path}/./in.jsonl"), "symlink": tmp_path / "link.jsonl"}[spelling]
    if spelling == "symlink":
        other.symlink_to(inp)
    p = gen(inp, "-o", other, "--base-url", "http://127.0.0.1:9/v1")
    assert p.returncode == 2 and "same file" in p.stderr, p.stderr
    assert inp.read_bytes() == before
    assert not (tmp_path / "in.jsonl.cache.db").exists()


@pytest.mark.parametrize("flags", [["--cache", "{out}"], ["--summary-json", "{out}"], ["--cache", "{inp}"],
                                   ["--summary-json", "{cache}"]])
def test_collisions_between_results_cache_and_summary_are_refused(tmp_path, flags):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    names = {"out": out, "inp": inp, "cache": tmp_path / "out.jsonl.cache.db"}
    p = gen(inp, "-o", out, "--base-url", "http://127.0.0.1:9/v1", *[f.format(**names) for f in flags])
    assert p.returncode == 2 and "same file" in p.stderr, p.stderr
    assert out.read_text() == "previous results\n" and inp.read_bytes().startswith(b'{"custom_id"')


def test_a_broken_cache_costs_the_previous_results_nothing(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    out = tmp_path / "out.jsonl"
    previous = b'{"id":"batch_req_1","custom_id":"a","response":null,"error":{"code":"x","message":"y"}}\n'
    out.write_bytes(previous)
    (tmp_path / "out.jsonl.cache.db").write_bytes(b"garbage" * 200)
    p = gen(inp, "-o", out, "--base-url", "http://127.0.0.1:9/v1")
    assert p.returncode == 2 and "not a usable cache" in p.stderr
    assert out.read_bytes() == previous


def test_a_file_that_generate_did_not_write_is_never_replaced(tmp_path):
    """-o, its .partial and --summary-json replace only what an earlier generate wrote: a text file or another
    run's cache named as the output is refused untouched; an earlier results file is replaced."""
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = gen(inp, "-o", tmp_path / "first.jsonl", "--base-url", sim.base_url, "--quiet")
        assert p.returncode == 0, p.stderr
        cache = tmp_path / "first.jsonl.cache.db"
        notes = tmp_path / "notes.txt"
        notes.write_text("mine\n")
        for target, flags in [(cache, ["-o", cache, "--cache", tmp_path / "other.db"]),
                              (notes, ["-o", notes]),
                              (notes, ["-o", tmp_path / "r.jsonl", "--summary-json", notes])]:
            before = target.read_bytes()
            p = gen(inp, *flags, "--base-url", sim.base_url, "--quiet")
            assert p.returncode == 2 and "writing would replace it" in p.stderr, p.stderr
            assert target.read_bytes() == before
        (tmp_path / "r.jsonl.partial").write_text("someone's draft\n")
        p = gen(inp, "-o", tmp_path / "r.jsonl", "--base-url", sim.base_url, "--quiet")
        assert p.returncode == 2 and "r.jsonl.partial" in p.stderr
        # What generate wrote before is its own to replace: results, and a summary.
        summary = tmp_path / "s.json"
        for _ in range(2):
            p = gen(inp, "-o", tmp_path / "first.jsonl", "--summary-json", summary, "--base-url", sim.base_url,
                    "--quiet")
            assert p.returncode == 0, p.stderr
        assert [r["custom_id"] for r in results(tmp_path / "first.jsonl")] == ["a"]
        # One line of an earlier result can be larger than what is read to tell (embeddings): still ours.
        big = tmp_path / "big.jsonl"
        big.write_bytes(b'{"id":"batch_req_1","custom_id":"a","response":{"status_code":200,"request_id":"","body":'
                        b'{"x":"' + b"y" * (2 << 20) + b'"}},"error":null}\n')
        p = gen(inp, "-o", big, "--base-url", sim.base_url, "--quiet")
        assert p.returncode == 0, p.stderr


def test_paths_that_cannot_be_used_are_one_line_errors(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    (tmp_path / "afile").write_text("x")
    for args, words in [
        ([tmp_path, "-o", tmp_path / "o.jsonl"], "is a directory"),
        ([inp, "-o", tmp_path], "is a directory"),
        ([inp, "-o", tmp_path / "afile" / "o.jsonl"], "not a directory"),
        ([tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl"], "no such file"),
    ]:
        p = gen(*args, "--base-url", "http://127.0.0.1:9/v1")
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_two_runs_on_one_cache_the_second_is_refused_and_nothing_is_paid_twice(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"question {i}") for i in range(200)])
    with SimThread(SimConfig(latency_ms=50, batch_delay_s=None)) as sim:
        first = subprocess.Popen([sys.executable, "-m", "tcia_async", "generate", str(inp), "-o",
                                  str(tmp_path / "a.jsonl"), "--cache", str(tmp_path / "c.db"), "--base-url",
                                  sim.base_url, "--concurrency", "8", "--quiet"], env=env())
        sim.wait_requests(1, timeout=30)
        second = gen(inp, "-o", tmp_path / "b.jsonl", "--cache", tmp_path / "c.db", "--base-url", sim.base_url)
        assert first.wait(60) == 0
        assert second.returncode == 2 and "in use by tcia-async process" in second.stderr
        assert not (tmp_path / "b.jsonl").exists()
        st = sim.stats()
        assert st["requests"] == 200 and st["duplicates"] == 0


def test_another_server_on_another_port_is_never_answered_from_the_cache(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"question {i}") for i in range(5)])
    cache = tmp_path / "c.db"
    with SimThread(SimConfig(batch_delay_s=None)) as a:
        assert gen(inp, "-o", tmp_path / "a.jsonl", "--cache", cache, "--base-url", a.base_url).returncode == 0
    with OddServer() as b:  # "a local vLLM" on another port, with the same cache
        p = gen(inp, "-o", tmp_path / "b.jsonl", "--cache", cache, "--base-url", b.base_url)
        assert p.returncode == 0, p.stderr
        assert b.requests == 5  # asked, not replayed from the simulator's answers
    assert all("[simulated]" not in r["response"]["body"]["choices"][0]["message"]["content"]
               for r in results(tmp_path / "b.jsonl"))


# -- exit codes and stops ------------------------------------------------------------------------------------------


def test_every_line_failing_is_not_success(tmp_path):
    inp = write(tmp_path / "in.jsonl", [orjson.dumps({"custom_id": f"q{i}", "body": {"model": "m", "messages": []}})
                                        for i in range(5)])  # each a 400
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", sim.base_url, "--summary-json", tmp_path / "s.json")
    assert p.returncode == 4 and "5 of 5 lines ended in an error (bad_request 5)" in p.stderr
    s = orjson.loads((tmp_path / "s.json").read_bytes())
    assert s["failed_by_code"] == {"bad_request": 5} and s["exit_code"] == 4
    assert len(results(tmp_path / "o.jsonl")) == 5


def test_a_provider_failing_on_everything_stops_in_bounded_time(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"question {i}") for i in range(300)])
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nunreachable_after = 1.0\nbackoff_base = 0.05\nbackoff_cap = 0.2\n")
    with SimThread(SimConfig(rate_500=1.0, batch_delay_s=None)) as sim:
        p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", sim.base_url, "--config", conf)
        sent = sim.stats()["requests"]
    assert p.returncode == 3 and "answered only errors" in p.stderr, p.stderr
    assert sent < 300 * 8  # stopped long before every line spent its 8 attempts


def test_a_dead_port_stops_with_exit_3(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nunreachable_after = 0.5\nbackoff_base = 0.05\nbackoff_cap = 0.1\nmax_attempts = 1000\n")
    p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--config", conf,
            "--summary-json", tmp_path / "s.json")
    assert p.returncode == 3 and "no connection to the provider" in p.stderr
    assert not (tmp_path / "o.jsonl").exists() and (tmp_path / "o.jsonl.partial").exists()
    summary = orjson.loads((tmp_path / "s.json").read_bytes())
    assert summary["sent"] == 0 and summary["retries"] > 0  # attempts that never connected sent nothing


def test_a_dead_port_stops_once_the_first_request_has_spent_its_attempts(tmp_path):
    """With the default two minutes of `unreachable_after`, a provider that never answered stops the run as soon
    as one request has spent its attempts: no line gets an error result, the rerun continues."""
    inp = write(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"question {i}") for i in range(20)])
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nbackoff_base = 0.01\nbackoff_cap = 0.02\n")
    p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--config", conf)
    assert p.returncode == 3 and "no connection to the provider" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    partial = tmp_path / "o.jsonl.partial"
    assert not partial.exists() or partial.read_bytes() == b""  # no line was recorded as failed


def test_one_request_failing_alone_is_recorded_and_the_run_goes_on(tmp_path):
    """A request that spends its attempts on 500s while the provider answers the others is that line's error,
    not a stop."""
    good = [chat_line(f"g{i}", f"question {i}") for i in range(5)]
    inp = write(tmp_path / "in.jsonl", good + [chat_line("bad", "500")])
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nbackoff_base = 0.01\nbackoff_cap = 0.02\nmax_attempts = 3\nconcurrency = 1\n")
    with OddServer() as srv:
        p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", srv.base_url, "--config", conf)
    assert p.returncode == 4, p.stderr
    rows = {r["custom_id"]: r for r in results(tmp_path / "o.jsonl")}
    assert rows["bad"]["error"] is not None and all(rows[f"g{i}"]["error"] is None for i in range(5))


# -- odd input and odd answers -------------------------------------------------------------------------------------


def test_odd_input_lines(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + b"\n".join([
        chat_line("first", "after a byte-order mark"),
        chat_line(123, "a number as custom_id"),
        chat_line("dup", "one"),
        chat_line("dup", "two"),
    ]) + b"\n")
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", sim.base_url)
        assert sim.stats()["requests"] == 2  # the BOM line and the first "dup"
    assert p.returncode == 4
    res = {(r["custom_id"], r["error"]["code"] if r["error"] else None) for r in results(tmp_path / "o.jsonl")}
    assert res == {("first", None), (123, "bad_input"), ("dup", None), ("dup", "duplicate_custom_id")}


def test_odd_answers_are_one_line_retried_or_capped(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line("cr", "cr"), chat_line("empty", "no-choices"),
                                        chat_line("endless", "endless"), chat_line("ok", "fine")])
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\nmax_attempts = 2\nbackoff_base = 0.01\nbackoff_cap = 0.02\n"
                    "max_response_bytes = 1048576\n")
    with OddServer() as srv:
        p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", srv.base_url, "--config", conf)
    assert p.returncode == 4, p.stderr
    out = tmp_path / "o.jsonl"
    with open(out, encoding="utf-8") as fh:  # a text-mode reader sees exactly one record per line
        records = {r["custom_id"]: r for r in map(orjson.loads, fh)}
    assert set(records) == {"cr", "empty", "endless", "ok"}
    assert records["cr"]["error"] is None and b"\r" not in out.read_bytes()
    assert records["empty"]["error"]["code"] == "invalid_response" and records["empty"]["error"]["attempts"] == 2
    assert records["endless"]["error"]["code"] == "response_too_large"
    assert records["ok"]["error"] is None


# -- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--rpm", "nan"], "--rpm = nan"),
    (["--tpm", "inf"], "--tpm = inf"),
    (["--rpm", "-5"], "--rpm = -5"),
    (["--rpm", "0"], "leave it out for no limit"),
    (["--timeout", "inf"], "--timeout = inf"),
    (["--timeout", "nan"], "--timeout = nan"),
    (["--concurrency", "0"], "--concurrency = 0"),
])
def test_bad_flag_values_are_named(tmp_path, flags, words):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", "http://127.0.0.1:9/v1", *flags)
    assert p.returncode == 2 and words in p.stderr, p.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("toml, words", [
    ("[engine.limits]\nrpm = -5\n", "[engine] limits.rpm = -5.0"),
    ("[engine.limits]\nrpm = 0\n", "[engine] limits.rpm = 0.0"),
    ("[engine]\ntimeout = nan\n", "[engine] timeout = nan"),
    ("[engine]\nconcurrency = 'many'\n", "[engine] concurrency: expected an integer"),
])
def test_bad_config_values_are_named_with_their_file_and_key(tmp_path, toml, words):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    conf = tmp_path / "c.toml"
    conf.write_text(toml)
    p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", "http://127.0.0.1:9/v1", "--config", conf)
    assert p.returncode == 2 and str(conf) in p.stderr and words in p.stderr, p.stderr


def test_a_bad_base_url_from_the_environment_is_named(tmp_path):
    inp = write(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    e = env()
    e["OPENAI_BASE_URL"] = "ftp://example"
    p = subprocess.run([sys.executable, "-m", "tcia_async", "generate", str(inp), "-o", str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True, env=e, timeout=60)
    assert p.returncode == 2 and "$OPENAI_BASE_URL = 'ftp://example'" in p.stderr


def test_faults_of_every_kind_lose_nothing_and_pay_nothing_twice(tmp_path):
    """5xx, resets, truncated and non-JSON bodies and hangs on 25 % of requests: every line gets its answer,
    exit 0, and the simulator answered each request once (a retry only follows a failed attempt)."""
    n = 300
    inp = write(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"question {i}") for i in range(n)])
    conf = tmp_path / "c.toml"
    conf.write_text("[engine]\ntimeout = 2\nbackoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 20\n")
    sim_cfg = SimConfig(rate_500=0.05, rate_503=0.05, rate_reset=0.05, rate_truncated=0.05, rate_non_json=0.03,
                        rate_hang=0.02, hang_s=5, batch_delay_s=None)
    with SimThread(sim_cfg) as sim:
        p = gen(inp, "-o", tmp_path / "o.jsonl", "--base-url", sim.base_url, "--config", conf, "--concurrency", "32")
        st = sim.stats()
    assert p.returncode == 0, p.stderr
    res = results(tmp_path / "o.jsonl")
    assert sorted(r["custom_id"] for r in res) == sorted(f"q{i}" for i in range(n))
    assert all(r["error"] is None for r in res)
    assert sum(st["faults"].values()) > 0.15 * n
    assert st["unique"] == n and st["duplicates"] == 0
