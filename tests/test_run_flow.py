"""`tcia-async run` as a user runs it, against the simulator: every output, resume without paying twice, faults,
bad input, a kill -9, streaming stages, and the Evol-Instruct baseline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tcia_async.sim import SimConfig, SimThread

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tcia_async" / "data"
SMALL = """
[explore]
sample = 6
[contexts]
per_instruction = 2
[respond]
generators = ["gpt-4.1-mini", "gpt-4.1-nano"]
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("OPENAI_BASE_URL", None)
    e["OPENAI_API_KEY"] = "sk-test-not-a-real-key"
    return e


DB: list[Path] = []  # the session's hashed task DB (fixture `db` below)


def argv(out: Path, base: str, config: Path, *more: str, seeds: Path = DATA / "seeds.jsonl") -> list[str]:
    return [sys.executable, "-m", "tcia_async", "run", str(seeds), "--contexts", str(DATA / "contexts.jsonl"),
            "--out", str(out), "--base-url", base, "--config", str(config), "--db", str(DB[0]), "--quiet", *more]


@pytest.fixture(autouse=True)
def db(hashed_db: Path) -> Path:
    DB[:] = [hashed_db]
    return hashed_db


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env(), timeout=timeout)


def lines(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture
def small(tmp_path: Path) -> Path:
    p = tmp_path / "small.toml"
    p.write_text(SMALL)
    return p


@pytest.mark.slow
def test_a_run_writes_every_output_and_a_rerun_pays_nothing(tmp_path, small):
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, small))
        assert p.returncode == 0, p.stderr
        paid = sim.stats()["requests"]
        instructions = lines(out / "instructions.jsonl")
        sft = lines(out / "sft.jsonl")
        prefs = lines(out / "preferences.jsonl")
        report = orjson.loads((out / "report.json").read_bytes())

        assert len(instructions) == 3 * 6 and len({i["id"] for i in instructions}) == 18
        for i in instructions:
            assert i["hop"] >= 1 and len(i["ops"]) == i["hop"] and i["constraints"]
            assert {c["origin"] for c in i["constraints"]} <= {"seed", "retrieved"}
            assert i["kept"] == (i["dropped"] is None)
            if i["dropped"] != "not_covered":
                assert "{context}" in i["prompt"] and i["validity"]["reason"] and i["on_task"] is not None
        kept = [i for i in instructions if i["kept"]]
        assert kept and len(sft) == 2 * len(kept)  # two contexts per kept instruction
        for ex in sft:  # TRL / Hugging Face chat format
            assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
            assert "{context}" not in ex["messages"][0]["content"]
            assert ex["metadata"]["generator"] in ("gpt-4.1-mini", "gpt-4.1-nano")
        assert len({ex["metadata"]["pair_id"] for ex in sft}) == len(sft)
        for pr in prefs:  # TRL's DPO format
            assert pr["chosen"] != pr["rejected"] and pr["chosen_mean"] - pr["rejected_mean"] >= 1.0
        assert report["method"] == "tcia" and report["simulated"] is True
        for row in report["per_hop"]:
            assert set(row) >= {"hop", "sets", "sets_unique", "sampled", "composed", "verified", "valid", "kept"}
        assert sum(r["sampled"] for r in report["per_hop"]) == 18
        assert report["funnel"]["sft_examples"] == len(sft)
        assert report["requests"]["by_stage"]["judge"]["ok"] > 0 and report["time"]["wall_s"] > 0
        assert (out / "report.md").read_text().startswith("# tcia-async run report")
        assert (out / "timeline.png").stat().st_size > 0

        # A rerun of a finished run sends nothing and writes the same records.
        p = run(argv(out, sim.base_url, small))
        assert p.returncode == 0, p.stderr
        assert sim.stats()["requests"] == paid
        assert sorted(map(orjson.dumps, lines(out / "instructions.jsonl"))) == sorted(map(orjson.dumps, instructions))
        assert sorted(map(orjson.dumps, lines(out / "sft.jsonl"))) == sorted(map(orjson.dumps, sft))


@pytest.mark.slow
def test_faults_change_nothing_but_the_retries(tmp_path, small):
    with SimThread(SimConfig(batch_delay_s=None)) as clean:
        assert run(argv(tmp_path / "clean", clean.base_url, small)).returncode == 0
    with SimThread(SimConfig(error_rate=0.08, batch_delay_s=None)) as faulty:
        p = run(argv(tmp_path / "faulty", faulty.base_url, small))
        assert p.returncode == 0, p.stderr
        assert sum(faulty.stats()["faults"].values()) > 0
    a = sorted(map(orjson.dumps, lines(tmp_path / "clean" / "sft.jsonl")))
    b = sorted(map(orjson.dumps, lines(tmp_path / "faulty" / "sft.jsonl")))
    assert a == b
    report = orjson.loads((tmp_path / "faulty" / "report.json").read_bytes())
    assert report["requests"]["total"]["retries"] > 0


def test_bad_seed_lines_are_named_and_the_good_ones_run(tmp_path, small):
    seeds = tmp_path / "seeds.jsonl"
    good = orjson.loads((DATA / "seeds.jsonl").read_bytes().splitlines()[0])
    seeds.write_bytes(b"\n".join([
        orjson.dumps(good),
        b"{not json",
        orjson.dumps({"id": "no-instruction"}),
        orjson.dumps(good),  # the same id again
        orjson.dumps({"id": "bare", "instruction": "Hi."}),  # no requirement: nothing to explore
        orjson.dumps({**good, "id": "typo", "context": ["a misspelt field"]}),
        orjson.dumps({**good, "id": "blank", "contexts": ["Ana: ship it Friday.", "   "]}),  # an empty context
    ]) + b"\n")
    contexts = tmp_path / "contexts.jsonl"  # the first seed's contexts, and one without its context
    contexts.write_bytes(b"\n".join((DATA / "contexts.jsonl").read_bytes().splitlines()[:6]
                                    + [b'{"seed_id": "meeting-summary"}']) + b"\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, small, "--contexts", str(contexts), seeds=seeds))
    assert p.returncode == 4, p.stderr  # finished, but some items ended in an error
    for line in (2, 3, 4, 6, 7):
        assert f"seeds.jsonl:{line}:" in p.stderr
    assert "seeds.jsonl:7: contexts[1] is empty" in p.stderr
    assert "contexts.jsonl:7:" in p.stderr
    assert "seeds.jsonl:6: context: unknown field" in p.stderr
    assert "seeds.jsonl:3: instruction: missing" in p.stderr
    # Every bad line is a failure of the run, in failures.jsonl and the report, as the message says.
    failures = lines(out / "failures.jsonl")
    assert [(f["stage"], f["id"], f["code"]) for f in failures] == [
        *[("input", f"{seeds}:{n}", "bad_line") for n in (2, 3, 4, 6, 7)], ("input", f"{contexts}:7", "bad_line"),
        ("decompose", "bare", "no_task")]
    assert "already used on line 1" in failures[2]["reason"]
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["funnel"]["failures"] == {"input": 6, "decompose": 1}
    assert "7 items ended in an error (bad input lines 6, decompose 1)" in p.stderr
    assert len(lines(out / "instructions.jsonl")) == 6


def test_contexts_of_seeds_not_in_the_run_are_a_note_not_an_error(tmp_path, small):
    seeds = tmp_path / "two.jsonl"  # the shipped contexts also hold six of the third seed's
    seeds.write_bytes(b"\n".join((DATA / "seeds.jsonl").read_bytes().splitlines()[:2]) + b"\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, small, seeds=seeds))
    assert p.returncode == 0, p.stderr
    assert "skipped" not in p.stderr and "error" not in p.stderr
    notes = [x for x in p.stderr.splitlines() if "for seeds not in this run" in x]
    assert len(notes) == 1 and "6 contexts" in notes[0] and "'support-email'" in notes[0], p.stderr
    assert lines(out / "failures.jsonl") == []
    assert orjson.loads((out / "report.json").read_bytes())["funnel"]["failures"] == {}


def test_a_provider_refusing_embeddings_fails_the_items_and_the_report_says_what_it_lacks(tmp_path, small):
    """Embeddings refused (a 400): the seeds fail at retrieval (exit 4, failures.jsonl) and the report's diversity
    is said to be missing; no traceback."""
    from oddserver import OddServer

    hosted = tmp_path / "hosted-db"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run([sys.executable, "-m", "tcia_async", "db", "reembed", str(DB[0]), "--out", str(hosted),
                 "--embedding-model", "emb-test", "--base-url", sim.base_url, "--quiet"])
        assert p.returncode == 0, p.stderr
        with OddServer() as odd:
            out = tmp_path / "run"
            p = run(argv(out, sim.base_url, small, "--embedding-base-url", odd.base_url, "--db", str(hosted)))
    assert p.returncode == 4 and "Traceback" not in p.stderr, p.stderr
    assert "the report's diversity was not measured" in p.stderr
    assert {f["stage"] for f in lines(out / "failures.jsonl")} == {"retrieve"}
    assert orjson.loads((out / "report.json").read_bytes())["status"] == "complete"


def test_a_seed_that_points_at_an_input_it_lacks_is_a_failure(tmp_path, small):
    """A seed asking about "the customer email below" with no contexts would make examples about material that is
    not there: it goes to failures.jsonl (exit 4) instead; a seed with its contexts runs."""
    seeds = tmp_path / "seeds.jsonl"
    shipped = [orjson.loads(x) for x in (DATA / "seeds.jsonl").read_bytes().splitlines()]
    contexts = {}
    for x in (DATA / "contexts.jsonl").read_bytes().splitlines():
        c = orjson.loads(x)
        contexts.setdefault(c["seed_id"], []).append(c["context"])
    with_input = {**shipped[0], "contexts": contexts[shipped[0]["id"]][:2]}
    without = {"id": "no-input", "instruction": "Write a reply to the customer. Use the customer email provided below. "
               "Keep the reply under 120 words. Use a friendly tone."}  # its decomposition has an Input Placeholder
    seeds.write_bytes(orjson.dumps(with_input) + b"\n" + orjson.dumps(without) + b"\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run([sys.executable, "-m", "tcia_async", "run", str(seeds), "--out", str(out), "--base-url",
                 sim.base_url, "--config", str(small), "--db", str(DB[0]), "--quiet"])
    assert p.returncode == 4, p.stderr
    failures = lines(out / "failures.jsonl")
    assert [(f["stage"], f["id"], f["code"]) for f in failures] == [("decompose", "no-input", "no_contexts")]
    assert "points at an input" in failures[0]["reason"]
    assert {r["metadata"]["seed_id"] for r in lines(out / "sft.jsonl")} == {with_input["id"]}


def test_a_cost_with_some_models_unpriced_is_said_to_be_partial(tmp_path):
    """Prices for the judge only: the report's cost names the models it counts as free, and the run says so."""
    settings = tmp_path / "priced.toml"
    settings.write_text(SMALL + '[judge]\nmodel = "gpt-4.1"\n[engine.prices."gpt-4.1"]\ninput = 2.0\noutput = 8.0\n')
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, settings))
    assert p.returncode == 0, p.stderr
    cost = orjson.loads((out / "report.json").read_bytes())["cost"]
    assert cost["priced"] and "gpt-4.1-mini" in cost["unpriced_models"] and "gpt-4.1" not in cost["unpriced_models"]
    assert "the report's cost is partial: no price for" in p.stderr
    assert "**Partial cost**" in (out / "report.md").read_text()


def test_a_replay_keeps_the_timings_of_the_run_that_sent_the_requests(tmp_path, small):
    seeds = tmp_path / "one.jsonl"
    seeds.write_bytes((DATA / "seeds.jsonl").read_bytes().splitlines()[0] + b"\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        assert run(argv(out, sim.base_url, small, seeds=seeds)).returncode == 0
        first = orjson.loads((out / "report.json").read_bytes())
        timeline = (out / "timeline.png").read_bytes()
        for _ in range(2):  # a replay of a replay keeps them too
            p = run(argv(out, sim.base_url, small, seeds=seeds))
            assert p.returncode == 0, p.stderr
            again = orjson.loads((out / "report.json").read_bytes())
            assert again["replay"] is True and again["requests"]["total"]["sent"] == 0
            replay = again["time"].pop("replay")
            assert again["time"] == first["time"] and again["stages"] == first["stages"]
            assert replay["kept"] is True and replay["command_s"] > 0
            assert (out / "timeline.png").read_bytes() == timeline
            md = (out / "report.md").read_text()
            assert (f"Pipeline {first['time']['wall_s']:.1f} s" in md and "when the requests were sent; this rerun "
                    f"replayed every answer from the cache in {replay['command_s']:.1f} s" in md)
        # Without the report of the run that sent them, the replay's timings are said to be the replay's.
        (out / "report.json").unlink()
        assert run(argv(out, sim.base_url, small, seeds=seeds)).returncode == 0
        alone = orjson.loads((out / "report.json").read_bytes())
        assert alone["replay"] is True and alone["time"]["replay"]["kept"] is False
        assert alone["time"]["wall_s"] == alone["time"]["replay"]["wall_s"] != first["time"]["wall_s"]
        assert "these are the replay's timings" in (out / "report.md").read_text()


def test_settings_and_paths_are_checked_before_anything_is_written(tmp_path, small):
    out = tmp_path / "run"
    bad = tmp_path / "bad.toml"
    bad.write_text("[explore]\nqueu_limit = 3\n")
    p = run(argv(out, "http://127.0.0.1:9/v1", bad))
    assert p.returncode == 2 and "queu_limit" in p.stderr and "bad.toml" in p.stderr
    bad.write_text("[validate]\nmin_validity = 9\n")
    p = run(argv(out, "http://127.0.0.1:9/v1", bad))
    assert p.returncode == 2 and "[validate] min_validity = 9" in p.stderr
    (tmp_path / "afile").write_text("x")
    p = run(argv(tmp_path / "afile", "http://127.0.0.1:9/v1", small))
    assert p.returncode == 2 and "not a directory" in p.stderr
    DB[:] = [tmp_path]
    p = run(argv(out, "http://127.0.0.1:9/v1", small))
    assert p.returncode == 2 and "not a task database" in p.stderr
    assert not out.exists()


def test_a_folder_of_someone_elses_files_is_refused_untouched(tmp_path, small):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sft.jsonl").write_text("MINE\n")
    p = run(argv(theirs, "http://127.0.0.1:9/v1", small))
    assert p.returncode == 2 and "a folder with files of its own (sft.jsonl)" in p.stderr, p.stderr
    assert sorted(x.name for x in theirs.iterdir()) == ["sft.jsonl"]
    assert (theirs / "sft.jsonl").read_text() == "MINE\n"
    # A file named like the run's cache is not enough: it must be a cache of tcia-async.
    import sqlite3

    with sqlite3.connect(theirs / "cache.db") as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    p = run(argv(theirs, "http://127.0.0.1:9/v1", small))
    assert p.returncode == 2 and "a folder with files of its own" in p.stderr, p.stderr
    assert sorted(x.name for x in theirs.iterdir()) == ["cache.db", "sft.jsonl"]


@pytest.mark.slow
def test_stages_overlap_the_first_answer_is_judged_before_the_last_set_is_composed(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(SMALL.replace("sample = 6", "sample = 30") + "[engine]\nconcurrency = 16\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(latency_ms=15, batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, conf))
        assert p.returncode == 0, p.stderr
    t = orjson.loads((out / "report.json").read_bytes())["time"]
    assert t["first_judged_answer_s"] < t["last_compose_s"]


@pytest.mark.slow
def test_kill_9_then_rerun_completes_with_every_record_once(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(SMALL.replace("sample = 6", "sample = 20") + "[engine]\nconcurrency = 8\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(latency_ms=20, batch_delay_s=None)) as sim:
        proc = subprocess.Popen(argv(out, sim.base_url, conf), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        sim.wait_requests(150, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while True:  # requests the killed run left on the wire end (their handlers notice the client is gone)
            st = sim.stats()
            if sum(st["by_status"].values()) + st["faults"].get("client_gone", 0) >= st["requests"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p = run(argv(out, sim.base_url, conf))
        assert p.returncode == 0, p.stderr
        st = sim.stats()
    assert st["duplicates"] <= 8 * 2  # at most what was on the wire (or answered but not yet written)
    ids = [i["id"] for i in lines(out / "instructions.jsonl")]
    assert len(ids) == len(set(ids)) == 60
    pairs = [x["metadata"]["pair_id"] for x in lines(out / "sft.jsonl")]
    assert len(pairs) == len(set(pairs))


@pytest.mark.slow
def test_the_evol_baseline_runs_three_hops_through_the_same_stages(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(SMALL + "[evol]\nper_hop = 4\n")
    out = tmp_path / "evol"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, conf, "--method", "evol"))
        assert p.returncode == 0, p.stderr
    ins = lines(out / "instructions.jsonl")
    assert {i["hop"] for i in ins} == {1, 2, 3} and len(ins) == 3 * 3 * 4
    assert all(i["method"] == "evol" and len(i["ops"]) == i["hop"] for i in ins)
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["method"] == "evol" and [r["sampled"] for r in report["per_hop"]] == [12, 12, 12]
    assert all(r["on_task_ratio"] is not None for r in report["per_hop"])
    # The simulator's rewrites repeat themselves: a seed's repeated instruction is dropped, never a second
    # identical training example.
    kept = [(i["seed_id"], " ".join(i["prompt"].split()).casefold()) for i in ins if i["kept"]]
    assert len(kept) == len(set(kept))
    sft = [orjson.dumps(r["messages"]) for r in lines(out / "sft.jsonl")]
    assert len(sft) == len(set(sft))
    assert report["funnel"]["dropped"].get("duplicate", 0) > 0


def test_ctrl_c_twice_stops_at_once_and_a_rerun_completes(tmp_path, small):
    out = tmp_path / "run"
    # Some requests hang for a minute: only a second Ctrl-C ends the run quickly.
    with SimThread(SimConfig(rate_hang=0.3, hang_s=60, batch_delay_s=None)) as sim:
        port = sim.port
        proc = subprocess.Popen(argv(out, sim.base_url, small)[:-1], env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        sim.wait_requests(10, timeout=60)
        proc.send_signal(signal.SIGINT)
        assert "interrupted: no new work" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert not (out / "sft.jsonl").exists() and (out / "sft.jsonl.partial").exists()
    with SimThread(SimConfig(port=port, batch_delay_s=None)) as sim:
        p = run(argv(out, sim.base_url, small))
        assert p.returncode == 0, p.stderr
        assert len(lines(out / "instructions.jsonl")) == 18


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    # the expensive stages in batch, the rest online
    SMALL.replace("[respond]\n", '[respond]\nmode = "batch"\n') + '[judge]\nmode = "batch"\n',
    # every LLM stage: compose's corrections make several rounds
    SMALL + '[run]\nmode = "batch"\n',
])
def test_batch_mode_gives_what_online_gives(tmp_path, small, settings):
    conf = tmp_path / "b.toml"
    conf.write_text(settings + "[batch]\npoll_interval = 0.02\npoll_max = 0.1\n")
    with SimThread(SimConfig(batch_delay_s=0.05)) as sim:
        assert run(argv(tmp_path / "online", sim.base_url, small)).returncode == 0
        before = sim.stats()
        p = run(argv(tmp_path / "batch", sim.base_url, conf))
        assert p.returncode == 0, p.stderr
        after = sim.stats()
        assert after["batch"]["lines_ok"] > before["batch"]["lines_ok"]
        again = run(argv(tmp_path / "batch", sim.base_url, conf))  # a rerun of a finished run sends nothing
        assert again.returncode == 0 and sim.stats()["requests"] == after["requests"]
    for name in ("sft.jsonl", "preferences.jsonl", "instructions.jsonl"):
        a = sorted(map(orjson.dumps, lines(tmp_path / "online" / name)))
        b = sorted(map(orjson.dumps, lines(tmp_path / "batch" / name)))
        assert a == b, name
    report = orjson.loads((tmp_path / "batch" / "report.json").read_bytes())
    assert report["batch"]["stages"] and report["batch"]["requests_by_batch"] > 0


@pytest.mark.slow
def test_ctrl_c_while_batches_wait_and_a_rerun_collects_them(tmp_path, small):
    import asyncio

    conf = tmp_path / "b.toml"
    conf.write_text(SMALL.replace("[respond]\n", '[respond]\nmode = "batch"\n')
                    + "[batch]\npoll_interval = 0.02\npoll_max = 0.05\n")
    out = tmp_path / "run"
    with SimThread(SimConfig(batch_delay_s=None)) as sim:  # batches move only when the test says so
        proc = subprocess.Popen(argv(out, sim.base_url, conf)[:-1], env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        created = asyncio.run_coroutine_threadsafe(sim.sim.handlers.batches.wait_created(2), sim._loop)
        created.result(60)  # both generators' batches are at the provider
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "batches in progress stay at the provider" in err
        sim.advance_batches()
        sim.advance_batches()
        p = run(argv(out, sim.base_url, conf))
        assert p.returncode == 0, p.stderr
        st = sim.stats()
    assert st["duplicates"] == 0  # each line answered once: the rerun reattached, nothing was uploaded twice
    assert len(lines(out / "sft.jsonl")) == 2 * len([i for i in lines(out / "instructions.jsonl") if i["kept"]])


def test_seeds_saved_with_a_byte_order_mark_keep_their_first_line(tmp_path: Path) -> None:
    # Windows editors start UTF-8 files with a BOM; every JSONL reader shares io.iter_jsonl, which drops it.
    from tcia_async.flows.run import read_seeds

    path = tmp_path / "seeds.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "instruction": "Summarise the meeting."}\n'
                     b"\n"
                     b'{"id": "b", "instruction": "Review the diff."}\n')
    warned: list[str] = []
    bad: list = []
    seeds = read_seeds(str(path), warned.append, bad)
    assert [s.id for s in seeds] == ["a", "b"]
    assert bad == [] and warned == []
