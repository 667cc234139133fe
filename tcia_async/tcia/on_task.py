"""Stage 6, on-task check: does a new instruction still ask for the seed's task? (The report's on-task ratio.)

The paper reports an on-task ratio per hop without saying how it was judged; ours is an LLM judge given the
seed and the new instruction, answering same task yes or no with a reason. Every composed instruction is
checked, kept or not, so the ratio covers all of a hop; an instruction off task is dropped (off_task).
"""

from __future__ import annotations

from typing import Any

from tcia_async.records import Check, Instruction, OnTaskAnswer
from tcia_async.tcia.common import block, body


def on_task_body(seed: str, candidate: str, *, model: str, temperature: float | None = None) -> dict[str, Any]:
    item = "\n\n".join(["Do these two instructions ask for the same task?", block("seed", seed),
                        block("candidate", candidate)])
    return body("on_task", item, model=model, temperature=temperature)


async def on_task(engine: Any, seed_instruction: str, instruction: Instruction, *, model: str,
                  temperature: float | None = None, priority: int = 0) -> Instruction:
    a = await engine.chat_json(on_task_body(seed_instruction, instruction.prompt, model=model,
                                            temperature=temperature),
                               OnTaskAnswer, schema_name="tcia_on_task", stage="on_task", priority=priority)
    instruction.on_task = Check(ok=a.same_task, reason=a.reason)
    if instruction.dropped is None and not a.same_task:
        instruction.dropped = "off_task"
    instruction.kept = instruction.dropped is None
    return instruction
