"""`tcia-async sim` as a separate process: the ready line, flags taking effect, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tcia_async.sim.cli import add_arguments, config_from_args


def start(*flags: str, entry: tuple[str, ...] = ("tcia_async.sim",)) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", *entry, "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert first.startswith("listening on http://127.0.0.1:") and first.rstrip().endswith("/v1"), first
    return proc, first.split()[-1]


def chat(base_url: str, i: int) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        base_url + "/chat/completions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]}).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.mark.parametrize(("sig", "entry"), [(signal.SIGTERM, ("tcia_async", "sim")),  # = `tcia-async sim`
                                           (signal.SIGINT, ("tcia_async.sim",))])
def test_cli_serves_applies_flags_and_stops_cleanly(sig, entry):
    proc, base_url = start("--rpm", "2", "--seed", "5", entry=entry)
    try:
        assert chat(base_url, 0)[0] == 200
        status, headers, _ = chat(base_url, 1)
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
        status, _, body = chat(base_url, 2)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/sim/stats", timeout=10) as r:
            assert json.loads(r.read())["by_status"] == {"200": 2, "429": 1}
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_cli_refuses_fault_rates_above_one():
    proc = subprocess.run([sys.executable, "-m", "tcia_async.sim", "--port", "0", "--error-rate", "0.9",
                           "--rate-hang", "0.5"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "more than 1" in proc.stderr


def test_cli_flags_map_onto_the_config():
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--port", "0", "--latency-ms", "300", "--per-token-ms", "2", "--jitter-ms", "100",
                      "--rpm", "60", "--tpm", "1000", "--rps", "5", "--error-rate", "0.05", "--seed", "9",
                      "--headers", "anthropic", "--quota-after", "3", "--batch-delay", "2.5",
                      "--embedding-dim", "64", "--rate-hang", "0.01", "--hang-s", "4", "--hang-then", "close"])
    cfg = config_from_args(a)
    assert (cfg.port, cfg.latency_ms, cfg.per_token_ms, cfg.jitter_ms) == (0, 300, 2, 100)
    assert (cfg.rpm, cfg.tpm, cfg.rps, cfg.error_rate, cfg.seed) == (60, 1000, 5, 0.05, 9)
    assert (cfg.headers, cfg.quota_after, cfg.batch_delay_s, cfg.embedding_dim) == ("anthropic", 3, 2.5, 64)
    assert (cfg.rate_hang, cfg.hang_s, cfg.hang_then, cfg.host) == (0.01, 4, "close", "127.0.0.1")
    help_text = p.format_help()
    for flag in ("--latency-ms", "--rpm", "--error-rate", "--headers", "--quota-after", "--batch-delay"):
        assert flag in help_text
    with pytest.raises(SystemExit):
        p.parse_args(["--error-rate", "2"])
