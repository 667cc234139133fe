"""Stage 10, select: the best answer of each pair for supervised fine-tuning, and a best/worst preference pair.

The best answer has the highest mean score; ties go to the shorter answer, then to the earlier generator in the
configured list. The worst is the lowest mean (ties: the longer, then the later generator). A preference pair
is made when best and worst differ by at least `margin`: TRL's conversational preference format (prompt, chosen
and rejected as message lists), like the SFT records, so a trainer applies the same chat template to both.
"""

from __future__ import annotations

from typing import Any

from tcia_async.records import Pair, Response


def best_and_worst(responses: list[Response]) -> tuple[Response, Response]:
    ranked = sorted(enumerate(responses), key=lambda ir: (-(ir[1].mean or 0.0), len(ir[1].text), ir[0]))
    return ranked[0][1], ranked[-1][1]


def _meta(pair: Pair) -> dict[str, Any]:
    ins = pair.instruction
    return {"pair_id": pair.id, "instruction_id": ins.id, "seed_id": ins.seed_id, "method": ins.method,
            "hop": ins.hop, "ops": ins.ops, "context_index": pair.context_index}


def select(pair: Pair, *, margin: float = 1.0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the SFT record, the preference record or None) of a judged pair."""
    best, worst = best_and_worst(pair.responses)
    sft = {"messages": [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": best.text}],
           "metadata": {**_meta(pair), "generator": best.generator, "scores": best.scores, "mean": best.mean,
                        "candidates": len(pair.responses)}}
    pref = None
    if best is not worst and (best.mean or 0.0) - (worst.mean or 0.0) >= margin:
        pref = {"prompt": [{"role": "user", "content": pair.prompt}],
                "chosen": [{"role": "assistant", "content": best.text}],
                "rejected": [{"role": "assistant", "content": worst.text}],
                "chosen_model": best.generator, "rejected_model": worst.generator,
                "chosen_scores": best.scores, "rejected_scores": worst.scores,
                "chosen_mean": best.mean, "rejected_mean": worst.mean, "metadata": _meta(pair)}
    return sft, pref
