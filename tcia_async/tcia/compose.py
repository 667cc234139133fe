"""Stage 4, compose -> verify -> refine: a constraint set becomes one instruction that states all of it.

Compose writes the base query, every constraint and the context placeholder (`{context}` between [CONTEXT] and
[END CONTEXT] lines) as one instruction. Verify asks, constraint by constraint, whether the instruction covers
it. While something is missing (a constraint not covered, or the placeholder), refine composes again with the
previous instruction and a critique, up to `refine_attempts` times; then the set is dropped (not_covered).
"""

from __future__ import annotations

from typing import Any

from tcia_async.records import ComposeAnswer, ConstraintSet, Instruction, SeedTask, VerifyAnswer
from tcia_async.tcia.common import block, body, numbered, placeholder_problem


def compose_body(task: SeedTask, cset: ConstraintSet, *, model: str, temperature: float | None = None,
                 previous: str | None = None, critique: list[str] | None = None) -> dict[str, Any]:
    parts = ["Write the instruction.", block("base_query", task.base_query),
             block("constraints", numbered(c.text for c in cset.constraints))]
    if previous is not None:
        parts.append(block("previous_prompt", previous))
        parts.append(block("critique", "\n".join(critique or [])))
    return body("compose", "\n\n".join(parts), model=model, temperature=temperature)


def verify_body(prompt: str, cset: ConstraintSet, *, model: str, temperature: float | None = None
                ) -> dict[str, Any]:
    item = "\n\n".join(["Check the instruction against the requirements.", block("prompt", prompt),
                        block("constraints", numbered(c.text for c in cset.constraints))])
    return body("verify", item, model=model, temperature=temperature)


def instruction_id(cset: ConstraintSet) -> str:
    return f"{cset.seed_id}/{cset.index:05d}"


async def compose(engine: Any, task: SeedTask, cset: ConstraintSet, *, method: str = "tcia",
                  model: str, temperature: float | None = None, verify_model: str | None = None,
                  verify_temperature: float | None = None, refine_attempts: int = 3, priority: int = 0
                  ) -> Instruction:
    """The instruction for `cset`: kept for the next stages, or dropped as not_covered after the refinements."""
    out = Instruction(id=instruction_id(cset), seed_id=cset.seed_id, method=method, hop=cset.hop,
                      ops=list(cset.ops), constraints=list(cset.constraints))
    previous: str | None = None
    critique: list[str] | None = None
    for attempt in range(1 + refine_attempts):
        stage = "compose" if attempt == 0 else "refine"
        answer = await engine.chat_json(
            compose_body(task, cset, model=model, temperature=temperature, previous=previous, critique=critique),
            ComposeAnswer, schema_name="tcia_compose", stage=stage, priority=priority,
            check=lambda a: placeholder_problem(a.prompt))
        out.prompt = answer.prompt.strip()
        out.compose_attempts = attempt + 1
        if not cset.constraints:
            out.uncovered = []
            return out
        verdict = await engine.chat_json(
            verify_body(out.prompt, cset, model=verify_model or model, temperature=verify_temperature),
            VerifyAnswer, schema_name="tcia_verify", stage="verify", priority=priority)
        covered = {r.index: r for r in verdict.results}
        missing = [i for i in range(1, len(cset.constraints) + 1) if not (i in covered and covered[i].covered)]
        out.uncovered = missing
        if not missing:
            return out
        previous = out.prompt
        critique = [f"{i}. not covered: {covered[i].reason if i in covered else 'no verdict was given'}"
                    for i in missing]
    out.dropped = "not_covered"
    return out
