"""Stage 8, respond: every generator model answers every (instruction, context) pair.

The answer is the product (it becomes the assistant turn of the training data), so it is asked for as plain
text, the instruction alone as the user message: no schema and no system prompt of ours that would shape it.
A generator that fails on a pair is left out of that pair; a pair no generator answered fails the stage.
"""

from __future__ import annotations

from typing import Any

import anyio

from tcia_async.records import Pair, Response


class NoAnswer(Exception):
    """No generator gave a usable answer to a pair."""


async def respond(engine: Any, pair: Pair, *, generators: list[str], temperature: float | None = None,
                  max_tokens: int | None = None, priority: int = 0) -> Pair:
    from tcia_async.engine import RequestFailed

    answers: dict[int, Response] = {}
    errors: list[str] = []

    async def one(i: int, model: str) -> None:
        req: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": pair.prompt}]}
        if temperature is not None:
            req["temperature"] = temperature
        if max_tokens is not None:
            req["max_tokens"] = max_tokens
        try:
            out = await engine.chat(req, stage="respond", priority=priority)
        except RequestFailed as exc:
            errors.append(f"{model}: {exc.error.code}")
            return
        text = (out["choices"][0]["message"].get("content") or "").strip()
        if text:
            answers[i] = Response(generator=model, text=text)
        else:
            errors.append(f"{model}: an empty answer")

    async with anyio.create_task_group() as tg:
        for i, model in enumerate(generators):
            tg.start_soon(one, i, model)
    if not answers:
        raise NoAnswer("no generator answered (" + "; ".join(errors) + ")")
    pair.responses = [answers[i] for i in sorted(answers)]  # the generators' order: the tie-break of select
    return pair
