"""Did corpus lines added since a revision learn the retrieval benchmark's descriptions? An audit of a figure.

The retrieval benchmark (benchmarks/retrieval.py) is held out only as long as the corpus is not written from its
descriptions. When instructions are added to the corpus, this compares, description by description, the
shipped database of revision REV with the one in the working tree, and flags every description that shares a
phrase (three words in a row) or most of its content words (60 %) with an added instruction. It prints the
descriptions that changed outcome, and the top-3 share over all descriptions and over the unflagged ones, for
both databases.

    python benchmarks/retrieval_overlap.py --since REV [--exclude "a description" ...]

`--exclude` also leaves out descriptions known to have reached the writers of the new lines (they count as
misses in the "without the excluded" figure).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from retrieval import DATA, load_queries  # noqa: E402
from tcia_async import embed  # noqa: E402
from tcia_async.retrieval import TaskDB  # noqa: E402

_STOP = {"a", "an", "the", "to", "of", "for", "my", "in", "and", "is", "it", "i", "me", "on", "with", "this", "that",
         "from", "into", "your", "be", "at", "as", "or", "by", "can", "you", "please", "write", "what", "does", "do"}


def _trigrams(text: str) -> set[tuple[str, ...]]:
    w = re.findall(r"[^\W_]+", text.lower())
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[^\W\d_]+", text.lower())) - _STOP


def close_line(query: str, lines: list[dict]) -> str | None:
    """The id of the first added instruction that shares a three-word phrase or 60 % of the query's content
    words with it, or None."""
    tri, words = _trigrams(query), _words(query)
    for line in lines:
        text = line["instruction"]
        if tri & _trigrams(text) or (words and len(words & _words(text)) / len(words) >= 0.6):
            return line["id"]
    return None


def _at(rev: str, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--since", required=True, help="the git revision whose corpus and shipped database to compare with")
    p.add_argument("--exclude", action="append", default=[], help="a description that reached the writers")
    args = p.parse_args(argv)
    queries = load_queries()
    old_ids = {json.loads(x)["id"] for x in _at(args.since, "tcia_async/data/corpus.jsonl").splitlines() if x.strip()}
    added = [c for c in map(json.loads, (DATA / "corpus.jsonl").read_text().splitlines()) if c["id"] not in old_ids]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.since, "tcia_async/data/taskdb"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        old = TaskDB.load(Path(tmp) / "tcia_async" / "data" / "taskdb")
        new = TaskDB.load(DATA / "taskdb")
        vectors = embed.local_models()["local"].embed([q["query"] for q in queries])

        def found(db: TaskDB) -> list[bool]:
            return [q["kind"] in [db.cluster_kind(h.cluster) for h in hits]
                    for q, hits in zip(queries, db.nearest_task_types(vectors, 3))]

        before, after = found(old), found(new)
    flags = [close_line(q["query"], added) for q in queries]
    for q, a, b, f in zip(queries, before, after, flags):
        if a != b:
            print(f"{'gained' if b else 'lost  '} [{q['kind']}] {q['query']!r}" + (f"  (close to {f})" if f else ""))
    n = len(queries)
    clean = [i for i, f in enumerate(flags) if f is None]
    kept = [i for i, q in enumerate(queries) if q["query"] not in args.exclude]
    summary = {
        "added_lines": len(added), "queries": n, "top3_before": round(sum(before) / n, 4),
        "top3_after": round(sum(after) / n, 4),
        "top3_after_without_excluded": round(sum(after[i] for i in kept) / n, 4),
        "unflagged": len(clean), "unflagged_top3_before": round(sum(before[i] for i in clean) / len(clean), 4),
        "unflagged_top3_after": round(sum(after[i] for i in clean) / len(clean), 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
