"""Stage 9, judge: every answer scored 1-5 on five dimensions (general quality, helpfulness, instruction
following, honesty, truthfulness), one call per answer, each score with a reason (README, `run`, step 6)."""

from __future__ import annotations

from typing import Any

import anyio

from tcia_async.records import JudgeAnswer, Pair, Response
from tcia_async.tcia.common import block, body, score_problem

DIMENSIONS = ("general_quality", "helpfulness", "instruction_following", "honesty", "truthfulness")


def judge_body(prompt: str, answer: str, *, model: str, temperature: float | None = None) -> dict[str, Any]:
    item = "\n\n".join(["Grade this answer.", block("instruction", prompt), block("answer", answer)])
    return body("judge", item, model=model, temperature=temperature)


def _problem(a: JudgeAnswer) -> str | None:
    return score_problem(**{d: getattr(a, d).score for d in DIMENSIONS})


async def judge(engine: Any, pair: Pair, *, model: str, temperature: float | None = None,
                priority: int = 0) -> Pair:
    """`pair` with every response scored. A response the judge could not score is left out."""
    from tcia_async.engine import RequestFailed

    async def one(r: Response) -> None:
        try:
            a = await engine.chat_json(judge_body(pair.prompt, r.text, model=model, temperature=temperature),
                                       JudgeAnswer, schema_name="tcia_judge", stage="judge", priority=priority,
                                       check=_problem)
        except RequestFailed:
            return
        r.scores = {d: getattr(a, d).score for d in DIMENSIONS}
        r.reasons = {d: getattr(a, d).reason for d in DIMENSIONS}
        r.mean = sum(r.scores.values()) / len(DIMENSIONS)

    async with anyio.create_task_group() as tg:
        for r in pair.responses:
            tg.start_soon(one, r)
    scored = [r for r in pair.responses if r.mean is not None]
    if not scored:
        raise RequestFailed.make("judge_failed", "the judge scored no answer of this pair")
    pair.responses = scored
    return pair
