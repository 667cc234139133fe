"""Rebuild the shipped task DB (tcia_async/data/taskdb/) from tcia_async/data/corpus.jsonl, offline.

Decompositions and embeddings come from tcia-async's simulator (rule-based decomposition, hashed word-n-gram
embeddings), so the result is deterministic and marked `simulated` in its manifest. The response cache goes to a
temporary directory, not into the package. Also prints the token figures used for the cost estimate of a real
build (requests and tokens per decomposed prompt).

    python scripts/build_shipped_db.py [--out tcia_async/data/taskdb] [--corpus tcia_async/data/corpus.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcia_async.config import EngineConfig  # noqa: E402
from tcia_async.engine import Engine  # noqa: E402
from tcia_async.engine.tokens import count_chat_prompt, count_embedding_input  # noqa: E402
from tcia_async.flows.taskdb import CorpusItem, build_db, iter_corpus  # noqa: E402
from tcia_async.retrieval import BuildParams  # noqa: E402
from tcia_async.sim import SimConfig, SimThread  # noqa: E402
from tcia_async.tcia.decompose import build_body  # noqa: E402

MODEL = "gpt-4.1"  # the model name sent (the simulator echoes it); the paper decomposed with GPT-4.1
# The simulator's embeddings are not any real model's: the manifest says so, and a query with a real model's
# vectors is refused.
EMBEDDING_MODEL = "tcia-sim-ngram"
DIM = 384
# The simulator's task types are coarse ("Summarization", or verb + object such as "Brainstorm Names") and its
# hashed-n-gram vectors put nearest neighbours at cosine distance 0.36-0.84 (median 0.58). eps 0.5 groups types
# that share a word ("Brainstorm Blog" / "Brainstorm Names"); 0.6 chains every "Write ..." type into one cluster.
PARAMS = BuildParams(eps=0.5, min_samples=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(ROOT / "tcia_async" / "data" / "corpus.jsonl"))
    p.add_argument("--out", default=str(ROOT / "tcia_async" / "data" / "taskdb"))
    a = p.parse_args(argv)
    out = Path(a.out)

    import anyio

    with tempfile.TemporaryDirectory() as tmp, SimThread(SimConfig(latency_ms=0, seed=0, embedding_dim=DIM,
                                                                    batch_delay_s=None)) as sim:
        async def run():
            cfg = EngineConfig(base_url=sim.base_url, cache_path=str(Path(tmp) / "cache.db"), concurrency=32)
            async with Engine(cfg) as engine:
                return await build_db(engine, a.corpus, out, model=MODEL, embedding_model=EMBEDDING_MODEL,
                                      params=PARAMS, concurrency=32, simulated=True,
                                      simulator={"embedding_dim": DIM})

        db, summary = anyio.run(run)
        ledger = sim.stats()

    # records.jsonl is written in completion order; sort it by corpus line so a rebuild gives the same file.
    rec = out / "records.jsonl"
    rows = rec.read_bytes().splitlines(keepends=True)
    rec.write_bytes(b"".join(sorted(rows, key=lambda r: json.loads(r)["line"])))
    failures = out / "failures.jsonl"
    if failures.exists() and failures.stat().st_size == 0:
        failures.unlink()

    # Token figures for the cost estimate: prompt tokens counted as the engine counts them (tiktoken), completion
    # tokens from the simulator's ledger (only chat calls complete), embedding input tokens counted likewise.
    items = [it for it in iter_corpus(a.corpus) if isinstance(it, CorpusItem)]
    prompt = sum(count_chat_prompt(build_body(it.text, model=MODEL)) for it in items)
    embed_in = (count_embedding_input("text-embedding-3-small", [t.text for t in db.types])
                + count_embedding_input("text-embedding-3-small", [c.text for c in db.constraints]))
    n = max(summary.decomposed, 1)
    figures = {
        "decomposed": summary.decomposed,
        "prompt_tokens_per_decomposition": round(prompt / max(len(items), 1), 1),
        "completion_tokens_per_decomposition": round(ledger["tokens"]["completion"] / n, 1),
        "embedding_texts_per_decomposition": round((len(db.types) + len(db.constraints)) / n, 3),
        "embedding_tokens_per_decomposition": round(embed_in / n, 2),
        "simulator_requests": ledger["requests"],
    }
    print(json.dumps({"stats": db.stats(top=10), "cost_figures": figures}, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
