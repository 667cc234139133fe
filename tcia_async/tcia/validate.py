"""Stage 5, validate: validity and self-consistency of a composed instruction, each 1-5 with a reason.

An instruction is kept when both scores reach their thresholds (4 by default); otherwise it is dropped as
invalid (validity below) or inconsistent (consistency below), the scores and reasons kept in its record.
"""

from __future__ import annotations

from typing import Any

from tcia_async.records import Check, Instruction, ValidateAnswer
from tcia_async.tcia.common import block, body, score_problem


def validate_body(prompt: str, *, model: str, temperature: float | None = None) -> dict[str, Any]:
    return body("validate", "Review this instruction.\n\n" + block("prompt", prompt), model=model,
                temperature=temperature)


def _problem(a: ValidateAnswer) -> str | None:
    return score_problem(validity=a.validity, consistency=a.consistency)


async def validate(engine: Any, instruction: Instruction, *, model: str, temperature: float | None = None,
                   min_validity: int = 4, min_consistency: int = 4, priority: int = 0) -> Instruction:
    """`instruction` with its two scores; `dropped` set when one is below its threshold."""
    a = await engine.chat_json(validate_body(instruction.prompt, model=model, temperature=temperature),
                               ValidateAnswer, schema_name="tcia_validate", stage="validate", priority=priority,
                               check=_problem)
    instruction.validity = Check(score=a.validity, reason=a.validity_reason)
    instruction.consistency = Check(score=a.consistency, reason=a.consistency_reason)
    if instruction.dropped is None:
        if a.validity < min_validity:
            instruction.dropped = "invalid"
        elif a.consistency < min_consistency:
            instruction.dropped = "inconsistent"
    return instruction
