"""`tcia-async db build | query | stats` end to end against the in-process simulator and the real engine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tcia_async.cli import main
from tcia_async.retrieval import TaskDB
from tcia_async.sim import SimConfig, SimThread

GOOD = [
    {"id": "a1", "instruction": "Summarize the meeting transcript below. Use at most 100 words. Use bullet points."},
    {"id": "a2", "instruction": "Summarize the sales call notes. Use a neutral tone. List every action item."},
    {"id": "a3", "prompt": "Translate the paragraph into French. Keep the formal register."},
    {"messages": [{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": "Write a Python function that reverses a list. Include a docstring."},
                  {"role": "assistant", "content": "def f(x): ..."}]},
    {"id": "a5", "instruction": "Write an email to a client about a delayed shipment. Keep it under 150 words."},
    {"id": "a6", "instruction": "Write a SQL query that lists the ten largest orders. Return only the query."},
    {"id": "a7", "instruction": "Say hello."},  # one sentence: no constraints, non-complex
]


def write_corpus(path: Path) -> Path:
    """Seven good lines and two bad ones: a build writes the database without them and exits 4."""
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), "{not json", json.dumps(GOOD[2]),
             json.dumps({"id": "x", "text": "wrong field"}), json.dumps(GOOD[3]), "", json.dumps(GOOD[4]),
             json.dumps(GOOD[5]), json.dumps(GOOD[6])]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def simulator():
    with SimThread(SimConfig(latency_ms=0, embedding_dim=96, batch_delay_s=None)) as s:
        yield s


def build(corpus: Path, out: Path, url: str, *extra: str) -> int:
    return main(["db", "build", str(corpus), "--out", str(out), "--base-url", url, "--model", "gpt-test",
                 "--embedding-model", "emb-test", "--concurrency", "4", "--quiet", *extra])


def test_build_reports_bad_lines_and_writes_a_complete_db(tmp_path: Path, simulator, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert build(corpus, tmp_path / "db", simulator.base_url, "--eps", "0.3") == 4
    err = capsys.readouterr().err
    # Bad lines name the file and line; the good ones all went through.
    assert f"{corpus}:3:" in err and "not valid JSON" in err
    assert f"{corpus}:5:" in err and "no instruction" in err
    db = TaskDB.load(tmp_path / "db")
    m = db.manifest
    assert (m.counts.records, m.counts.non_complex) == (7, 1)
    assert m.skipped == {"bad_lines": 2, "failed": 0}
    assert m.simulated and m.simulator == {"embedding_dim": 96}
    assert (m.embedding_model, m.embedding_dim, m.decompose_model) == ("emb-test", 96, "gpt-test")
    assert m.corpus_hash == "sha256:" + hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert m.parameters.eps == 0.3
    records = [json.loads(x) for x in (tmp_path / "db" / "records.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in records) == [1, 2, 4, 6, 8, 9, 10]
    by_line = {r["line"]: r for r in records}
    # The chat record's first user turn was decomposed, not the system prompt.
    assert "reverses a list" in by_line[6]["decomposition"]["tasks"][0]["base_query"]
    failures = [json.loads(x) for x in (tmp_path / "db" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["line"] for f in failures) == [3, 5]
    # The constraints were pooled under their task types and indexed.
    assert db.constraint_id("Use bullet points") is not None
    summ = [h for h in db.types if "Summar" in h.text]
    assert summ and all(db.cluster(t.cluster) for t in summ)


def test_rerun_sends_nothing_and_resume_sends_only_the_rest(tmp_path: Path, simulator) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    simulator.reset()
    # A first, partial run (as if killed after 3 lines), then the full run with the same cache.
    assert build(corpus, tmp_path / "db", simulator.base_url, "--limit", "3") == 4
    partial = simulator.stats()
    assert partial["duplicates"] == 0 and partial["ok"] >= 3
    assert build(corpus, tmp_path / "db", simulator.base_url) == 4
    full = simulator.stats()
    assert full["duplicates"] == 0, "a resumed build re-sent an answered call"
    first = {n: (tmp_path / "db" / n).read_bytes() for n in ("types.jsonl", "clusters.jsonl", "constraints.jsonl",
                                                            "types.hnsw", "constraints.hnsw", "manifest.json")}
    # A rerun of the finished build is answered from the cache alone and writes the same database.
    before = simulator.stats()["requests"]
    assert build(corpus, tmp_path / "db", simulator.base_url) == 4
    assert simulator.stats()["requests"] == before
    for name, data in first.items():
        assert (tmp_path / "db" / name).read_bytes() == data, name


def test_build_url_flag_then_settings_file_then_environment(tmp_path: Path, simulator, monkeypatch) -> None:
    """db build takes its settings in the order every command does (`generate --help`, README): a flag, then
    the [engine] table of --config, then $OPENAI_BASE_URL."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    settings = tmp_path / "db.toml"
    settings.write_text(f'[engine]\nbase_url = "{simulator.base_url}"\n')
    common = ["--model", "gpt-test", "--embedding-model", "emb-test", "--concurrency", "4", "--quiet"]
    with SimThread(SimConfig(latency_ms=0, embedding_dim=96, batch_delay_s=None)) as other:
        monkeypatch.setenv("OPENAI_BASE_URL", other.base_url)
        assert main(["db", "build", str(corpus), "--out", str(tmp_path / "db1"), "--config", str(settings),
                     *common]) == 4
        assert other.stats()["ok"] == 0, "$OPENAI_BASE_URL was preferred to the settings file"
        assert TaskDB.load(tmp_path / "db1").manifest.counts.records == 7
        # A flag beats the file.
        assert main(["db", "build", str(corpus), "--out", str(tmp_path / "db2"), "--config", str(settings),
                     "--base-url", other.base_url, *common]) == 4
        assert other.stats()["ok"] > 0
    # The file alone names the API: no --base-url is asked for.
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert main(["db", "build", str(corpus), "--out", str(tmp_path / "db3"), "--config", str(settings),
                 *common]) == 4


def test_db_concurrency_flag_then_settings_file_then_64(tmp_path: Path, simulator, monkeypatch) -> None:
    """`[engine] concurrency` of --config applies to db build and reembed (a flag beats it); without either,
    the db commands' own 64."""
    import tcia_async.flows.taskdb as flow

    seen: list[int] = []
    real_build, real_reembed = flow.build_db, flow.reembed_db

    async def build_db(*args, concurrency, **kw):
        seen.append(concurrency)
        return await real_build(*args, concurrency=concurrency, **kw)

    async def reembed_db(engine, db, model, identity, concurrency, simulated):
        seen.append(concurrency)
        return await real_reembed(engine, db, model, identity, concurrency, simulated)

    monkeypatch.setattr(flow, "build_db", build_db)
    monkeypatch.setattr(flow, "reembed_db", reembed_db)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    settings = tmp_path / "db.toml"
    settings.write_text("[engine]\nconcurrency = 7\n")
    common = ["--base-url", simulator.base_url, "--model", "gpt-test", "--embedding-model", "emb-test", "--quiet"]
    build = ["db", "build", str(corpus), *common]
    assert main([*build, "--out", str(tmp_path / "a"), "--config", str(settings)]) == 4
    assert main([*build, "--out", str(tmp_path / "b"), "--config", str(settings), "--concurrency", "3"]) == 4
    assert main([*build, "--out", str(tmp_path / "c")]) == 4
    reembed = ["db", "reembed", str(tmp_path / "a"), "--embedding-model", "emb-other", "--base-url",
               simulator.base_url, "--quiet"]
    assert main([*reembed, "--out", str(tmp_path / "d"), "--config", str(settings)]) == 0
    assert main([*reembed, "--out", str(tmp_path / "e")]) == 0
    assert seen == [7, 3, 64, 7, 64]


def test_a_refused_embedding_request_stops_build_reembed_and_query_with_exit_3(tmp_path: Path, simulator,
                                                                              capsys) -> None:
    """A provider that refuses the embedding requests a db command cannot do without (here a 400: unknown
    model): one line naming the failure, exit 3, no traceback."""
    from oddserver import OddServer

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert build(corpus, tmp_path / "db", simulator.base_url) == 4
    capsys.readouterr()
    data = Path(__file__).resolve().parent.parent / "tcia_async" / "data"
    few = {}
    for name in ("corpus.jsonl", "decompositions.jsonl"):  # decomposed already: only embeddings are asked for
        few[name] = tmp_path / name
        few[name].write_text("".join((data / name).read_text().splitlines(keepends=True)[:3]))
    with OddServer() as odd:
        assert main(["db", "build", str(few["corpus.jsonl"]), "--decompositions", str(few["decompositions.jsonl"]),
                     "--out", str(tmp_path / "db2"), "--embedding-model", "emb-test", "--base-url", odd.base_url,
                     "--quiet"]) == 3
        assert main(["db", "reembed", str(tmp_path / "db"), "--out", str(tmp_path / "db3"), "--embedding-model",
                     "emb-other", "--base-url", odd.base_url, "--quiet"]) == 3
        assert main(["db", "query", str(tmp_path / "db"), "summarise a meeting", "--base-url", odd.base_url]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "stopped: a request failed for good: bad_request" in line]
    # A provider whose every decomposition fails: nothing to build is its doing, exit 3 (not a usage error).
    with OddServer() as odd:
        assert main(["db", "build", str(few["corpus.jsonl"]), "--out", str(tmp_path / "db4"), "--base-url",
                     odd.base_url, "--embedding-model", "hashed", "--quiet"]) == 3
    assert "nothing to build: every decomposition failed (3 of 3 usable lines" in capsys.readouterr().err
    assert len(lines) == 3 and all("no such embedding model" in line for line in lines), err
    assert not (tmp_path / "db3").exists()


def test_a_folder_with_a_manifest_of_its_own_is_not_taken_for_a_database(tmp_path: Path, simulator) -> None:
    """A web app's manifest.json does not make its folder a task database: db build refuses it untouched."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my pwa"}')
    (app / "records.jsonl").write_text("my records\n")
    assert build(corpus, app, simulator.base_url) == 2
    assert (app / "manifest.json").read_text() == '{"name": "my pwa"}'
    assert sorted(x.name for x in app.iterdir()) == ["manifest.json", "records.jsonl"]


def test_reembed_never_takes_over_a_partial_folder_of_the_users(tmp_path: Path, simulator, capsys) -> None:
    """db reembed writes OUT.partial first: a folder of that name holding someone's files is refused untouched; an
    interrupted reembed's own files are taken up."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert build(corpus, tmp_path / "db", simulator.base_url) == 4
    theirs = tmp_path / "new.partial"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    reembed = ["db", "reembed", str(tmp_path / "db"), "--out", str(tmp_path / "new"), "--embedding-model", "hashed",
               "--quiet"]
    assert main(reembed) == 2
    assert "files of its own (notes.txt)" in capsys.readouterr().err
    assert [x.name for x in theirs.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
    (theirs / "notes.txt").unlink()
    (theirs / "types.jsonl").write_text("an interrupted attempt's\n")
    assert main(reembed) == 0 and TaskDB.load(tmp_path / "new").manifest.embedding_model == "hashed"


def test_query_and_stats(tmp_path: Path, simulator, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    db = tmp_path / "db"
    assert build(corpus, db, simulator.base_url) == 4
    capsys.readouterr()

    assert main(["db", "query", str(db), "Summarization", "-k", "2", "--json",
                 "--base-url", simulator.base_url]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and "Summar" in hits[0]["name"] and hits[0]["distance"] < hits[1]["distance"]
    assert hits[0]["samples"], "a task type comes with sample constraints"

    # No URL: the DB says it was built with the simulator, so the CLI starts one in-process.
    assert main(["db", "query", str(db), "--constraint", "Use bullet points", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "simulated" in out and "Use bullet points" in out.splitlines()[2]  # after the simulated-data and header lines

    # Another embedding model, or a simulator with another dimension, is refused with a clear message.
    assert main(["db", "query", str(db), "Summarization", "--embedding-model", "other-model",
                 "--base-url", simulator.base_url]) == 2
    assert "embedded with 'emb-test'" in capsys.readouterr().err
    with SimThread(SimConfig(embedding_dim=32, batch_delay_s=None)) as other:
        assert main(["db", "query", str(db), "Summarization", "--base-url", other.base_url]) == 2
    assert "dimension 32" in capsys.readouterr().err

    assert main(["db", "stats", str(db)]) == 0
    out = capsys.readouterr().out
    assert "non-complex 1 (14.3 %)" in out and "category mix" in out
    assert main(["db", "stats", str(db), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["records"] == 7 and stats["top_task_types"]


def test_usage_errors(tmp_path: Path, simulator, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert build(tmp_path / "missing.jsonl", tmp_path / "db", simulator.base_url) == 2
    assert "corpus file not found" in capsys.readouterr().err
    assert main(["db", "query", str(tmp_path / "nodb"), "x"]) == 2
    assert "no such database directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["db", "query", str(tmp_path / "empty"), "x"]) == 2
    assert "not a task database" in capsys.readouterr().err
    # Argument errors are found before any paid call.
    before = simulator.stats()["requests"]
    for bad in (["--eps", "-1"], ["--eps", "0"], ["--min-samples", "0"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit) as info:
            build(corpus, tmp_path / "db", simulator.base_url, *bad)
        assert info.value.code == 2, bad
    assert simulator.stats()["requests"] == before
    # A corpus with nothing usable is an error, not an empty database.
    (tmp_path / "blank.jsonl").write_text("\n")
    assert build(tmp_path / "blank.jsonl", tmp_path / "db2", simulator.base_url) == 2
    assert "nothing to build" in capsys.readouterr().err
    assert not (tmp_path / "db2" / "manifest.json").exists()


def test_quota_stop_exits_3_and_keeps_the_cache(tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    with SimThread(SimConfig(quota_after=3, batch_delay_s=None)) as limited:
        assert build(corpus, tmp_path / "db", limited.base_url, "--concurrency", "1") == 3
    err = capsys.readouterr().err
    assert "rerun the same command" in err
    assert not (tmp_path / "db" / "manifest.json").exists()
    assert (tmp_path / "db" / "cache.db").exists()


@pytest.mark.anyio
async def test_a_failed_decomposition_is_recorded_and_the_build_goes_on(tmp_path: Path, anyio_backend) -> None:
    from tcia_async.config import EngineConfig
    from tcia_async.engine import Engine, RequestFailed
    from tcia_async.flows.taskdb import build_db
    from tcia_async.records import ErrorOut
    from tcia_async.sim import Simulator

    class FailOne:
        """The real engine, except that decomposing the SQL instruction fails as a schema mismatch would."""

        def __init__(self, engine):
            self.engine = engine

        async def chat_json(self, body, typ, **kw):
            if "SQL query" in body["messages"][-1]["content"]:
                raise RequestFailed(ErrorOut(code="schema_mismatch", message="answer did not fit", attempts=3))
            return await self.engine.chat_json(body, typ, **kw)

        async def embed(self, texts, model, **kw):
            return await self.engine.embed(texts, model=model, **kw)

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    warnings: list[str] = []
    async with Simulator(SimConfig(batch_delay_s=None)) as sim:
        async with Engine(EngineConfig(base_url=sim.base_url, cache_path=None, concurrency=8)) as engine:
            db, summary = await build_db(FailOne(engine), corpus, tmp_path / "db", model="m", embedding_model="e",
                                         concurrency=3, simulated=True, progress=None, warn=warnings.append)
    assert (summary.decomposed, summary.failed, summary.bad_lines) == (6, 1, 2)
    assert any(f"{corpus}:9: decomposition failed (schema_mismatch" in w for w in warnings)
    assert db.manifest.skipped == {"bad_lines": 2, "failed": 1} and db.manifest.counts.records == 6
    failures = [json.loads(x) for x in (tmp_path / "db" / "failures.jsonl").read_text().splitlines()]
    assert {(f["line"], f["stage"]) for f in failures} == {(3, "read"), (5, "read"), (9, "decompose")}


def test_parquet_corpus(tmp_path: Path, simulator) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": str(i), "prompt": g.get("instruction") or g.get("prompt")} for i, g in enumerate(GOOD)
            if "messages" not in g]
    rows.append({"id": "empty", "prompt": ""})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert build(tmp_path / "c.parquet", tmp_path / "db", simulator.base_url) == 4
    assert TaskDB.load(tmp_path / "db").manifest.counts.records == len(rows) - 1
