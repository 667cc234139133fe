"""Plumbing shared by the benchmark scenarios: the simulator as a separate process, client subprocesses with
their own CPU and memory accounting, input files written streaming, and the machine description.

Every measured client runs in a process of its own, so its CPU time and peak RSS are its own (read with
`os.wait4`, which reports the resources of exactly that child) and client and server never share an event loop.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
# The harness checks for the project's modules the way its children import them (from this checkout).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DUMMY_KEY = "sk-bench-not-a-real-key"
MODEL = "gpt-4o-mini"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OPENAI_API_KEY"] = DUMMY_KEY
    # The project must be importable from a checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    # No proxy on loopback, whatever the user's environment says.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def have(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------------------
# The simulator, as a separate process
# ------------------------------------------------------------------------------------------------------------


def project_sim_available() -> bool:
    return have("tcia_async.sim.cli") and have("tcia_async.sim.__main__")


@dataclass
class SimSettings:
    latency_ms: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    rps: float | None = None


def sim_argv(settings: SimSettings) -> tuple[list[str], str]:
    """The command that starts a simulator with `settings`, and a label saying which server it is."""
    if project_sim_available():
        # The same command as `tcia-async sim`, without importing the rest of the CLI.
        argv = [PY, "-m", "tcia_async.sim", "--port", "0", "--latency-ms", str(settings.latency_ms)]
        label = "tcia-async sim"
    else:
        argv = [PY, str(HERE / "devsim.py"), "--port", "0", "--latency-ms", str(settings.latency_ms)]
        label = "benchmarks/devsim.py (stand-in: tcia_async.sim is not available)"
    for flag, value in (("--rpm", settings.rpm), ("--tpm", settings.tpm), ("--rps", settings.rps)):
        if value:
            argv += [flag, str(int(value))]
    return argv, label


class SimProcess:
    """A simulator in its own process. `base_url` is parsed from its start-up line; `stats()` reads its ledger.

    Start-up waits for the line `listening on URL` (or the process's end); a timer kills a server that neither
    prints it nor exits within `startup_timeout` seconds, so a broken server cannot hang the benchmark.
    """

    def __init__(self, settings: SimSettings, log_path: Path, startup_timeout: float = 60.0) -> None:
        self.settings = settings
        self.argv, self.label = sim_argv(settings)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> SimProcess:
        self._log = open(self.log_path, "ab")
        # A session (and process group) of its own, so __exit__ can end everything the server started.
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._log, text=True, env=child_env(), cwd=ROOT,
            start_new_session=True,
        )
        try:
            timer = watchdog(self.startup_timeout, self.proc)
            try:
                assert self.proc.stdout is not None
                for line in self.proc.stdout:
                    if line.startswith("listening on "):
                        self.base_url = line.split("listening on ", 1)[1].strip().rstrip("/")
                        break
            finally:
                timer.cancel()
            if not self.base_url:
                raise RuntimeError(f"simulator did not start ({' '.join(self.argv)}); see {self.log_path}")
        except BaseException:  # a failed start, or a signal while waiting for it: the server must not outlive us
            kill_group(self.proc)
            self.proc.wait()
            self.proc.stdout.close()  # type: ignore[union-attr]
            self._log.close()
            raise
        print(f"  simulator pid {self.proc.pid} listening on {self.base_url}", file=sys.stderr, flush=True)
        return self

    @property
    def root(self) -> str:
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def stats(self) -> dict:
        with urllib.request.urlopen(self.root + "/sim/stats", timeout=30) as resp:
            return json.loads(resp.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.root + "/sim/reset", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    def cpu_seconds(self) -> float | None:
        """The server process's CPU time so far (Linux /proc), or None where that cannot be read."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def sim_requests(stats: dict) -> int:
    return int(stats.get("requests", 0))


def sim_status(stats: dict, code: int) -> int:
    return int(stats.get("by_status", {}).get(str(code), 0))


# ------------------------------------------------------------------------------------------------------------
# Child processes with their own resource accounting
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    cpu_s: float  # user + system CPU of the child (and of any children it waited for)
    max_rss_mb: float
    stdout: str
    stderr_tail: str
    report: dict = field(default_factory=dict)  # the last JSON line the child printed, if any


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the process group of `proc`, a child started with `start_new_session=True` (so the group
    is its own and holds whatever it started). Does nothing once `proc` is known to be reaped: its id, and so
    the group's, may then belong to another process."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def watchdog(seconds: float, proc: subprocess.Popen) -> threading.Timer:
    """A started timer that kills `proc`'s group after `seconds` unless cancelled. A daemon thread: a signal that
    ends the harness between starting and cancelling it must not leave the interpreter waiting for it."""
    timer = threading.Timer(seconds, kill_group, (proc,))
    timer.daemon = True
    timer.start()
    return timer


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[int, object]:
    """Wait for `proc` with os.wait4 (its own rusage); kill its group when `timeout` seconds pass first."""
    timer = watchdog(timeout, proc) if timeout else None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if timer:
            timer.cancel()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # tell Popen the child is reaped
    return code, usage


def run_child(argv: list[str], log_path: Path, timeout: float | None = None) -> ChildResult:
    """Run `argv` to its end; its stdout is returned, its stderr goes to `log_path` (the tail is returned)."""
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(argv) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=child_env(), cwd=ROOT,
                                start_new_session=True)
        out_chunks: list[bytes] = []
        # Read stdout on a thread so a chatty child cannot block on a full pipe while we wait4 it.
        reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        try:
            code, usage = _wait(proc, timeout)
            wall = time.perf_counter() - t0
        finally:
            if proc.returncode is None:  # interrupted (a signal turned into an exception): end the child's group
                kill_group(proc)
                proc.wait()
            reader.join()
            proc.stdout.close()  # type: ignore[union-attr]
    stdout = b"".join(out_chunks).decode(errors="replace")
    report: dict = {}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except ValueError:
                pass
    return ChildResult(
        returncode=code,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,  # type: ignore[attr-defined]
        max_rss_mb=usage.ru_maxrss / 1024.0,  # type: ignore[attr-defined]  # KiB on Linux
        stdout=stdout,
        stderr_tail=tail(log_path),
        report=report,
    )


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def generate_argv(input_path: Path, output_path: Path, base_url: str, concurrency: int, *,
                  cache: Path | None, rpm: float | None = None, tpm: float | None = None,
                  rps: float | None = None) -> list[str]:
    """The `tcia-async generate` command line (run with this interpreter, so no console script is needed)."""
    argv = [PY, "-m", "tcia_async", "generate", str(input_path), "-o", str(output_path),
            "--base-url", base_url, "--concurrency", str(concurrency), "--quiet"]
    for flag, value in (("--rpm", rpm), ("--tpm", tpm), ("--rps", rps)):
        if value:
            argv += [flag, str(int(value))]
    if cache is not None:
        argv += ["--cache", str(cache)]
    return argv


def engine_command(input_path: Path, output_path: Path, base_url: str, concurrency: int, *, cache: Path,
                   rpm: float | None = None, tpm: float | None = None) -> tuple[list[str] | None, str]:
    """(argv, label) of the engine as a command: `tcia-async generate` when it exists, else the engine's Python
    API through clients.py (same engine, same cache; no CLI start-up around it). argv is None when neither can
    run; the label then says why."""
    if generate_cli_available() is None:
        return generate_argv(input_path, output_path, base_url, concurrency, cache=cache, rpm=rpm, tpm=tpm), \
            "tcia-async generate"
    why = engine_available()
    if why is not None:
        return None, why
    argv = [PY, str(HERE / "clients.py"), "engine", "--base-url", base_url, "--input", str(input_path), "--output",
            str(output_path), "-c", str(concurrency), "--cache", str(cache)]
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value:
            argv += [flag, str(value)]
    return argv, "Engine.generate via benchmarks/clients.py (tcia_async/flows/generate.py is not there yet)"


def engine_available() -> str | None:
    """None when the engine can be benchmarked, else the reason it cannot."""
    if not have("tcia_async.engine"):
        return "tcia_async.engine is not importable"
    try:
        proc = subprocess.run([PY, "-c", "from tcia_async.engine import Engine"], capture_output=True,
                              env=child_env(), cwd=ROOT, timeout=60)
    except subprocess.TimeoutExpired:
        return "importing tcia_async.engine timed out"
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return f"the engine is not there yet (from tcia_async.engine import Engine: {last[:100]})"
    return None


def generate_cli_available() -> str | None:
    """None when `tcia-async generate` exists, else the reason it does not."""
    if not have("tcia_async.flows.generate"):
        return "tcia_async/flows/generate.py is not there yet"
    proc = subprocess.run([PY, "-m", "tcia_async", "generate", "--help"], capture_output=True, env=child_env(),
                          cwd=ROOT, timeout=60)
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return f"`tcia-async generate --help` failed: {last}"
    return None


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def write_chat_requests(path: Path, n: int, *, tag: str = "bench", max_tokens: int = 16) -> Path:
    """Write `n` distinct Batch-format chat requests to `path`, streaming (memory does not grow with `n`)."""
    if path.exists() and path.stat().st_size > 0:
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb", buffering=1 << 20) as fh:
        for i in range(n):
            fh.write(orjson.dumps({
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Benchmark {tag} request {i}: reply in a few words."}],
                    "max_tokens": max_tokens,
                },
            }))
            fh.write(b"\n")
    os.replace(tmp, path)
    return path


def count_lines(path: Path) -> int:
    """Complete lines (ending in a newline) in `path`; 0 when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    dists = ["tcia-async", "aiohttp", "uvloop", "orjson", "msgspec", "anyio", "tiktoken", "hnswlib", "numpy",
             "openai", "litellm", "bespokelabs-curator", "matplotlib", "psutil"]
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "cpu": cpu_model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {d: _version(d) for d in dists},
    }
