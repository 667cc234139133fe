"""Stage 7, pair: each kept instruction with up to `per_instruction` of its seed's contexts (no LLM).

Contexts are drawn without repeats by a generator seeded with (run seed, instruction id), so a rerun pairs the
same way. The context replaces the instruction's `{context}` placeholder. A seed without contexts gives one pair
per instruction, with the placeholder block taken out.
"""

from __future__ import annotations

from tcia_async.records import Instruction, Pair
from tcia_async.tcia.common import fill
from tcia_async.tcia.explore import rng_for


def pairs(instruction: Instruction, contexts: list[str], *, per_instruction: int, run_seed: int = 0) -> list[Pair]:
    if not contexts:
        return [Pair(id=f"{instruction.id}/-", instruction=instruction, context_index=None,
                     prompt=fill(instruction.prompt, None))]
    rng = rng_for(run_seed, "pair", instruction.id)
    chosen = rng.sample(range(len(contexts)), min(per_instruction, len(contexts)))
    return [Pair(id=f"{instruction.id}/{i}", instruction=instruction, context_index=i,
                 prompt=fill(instruction.prompt, contexts[i])) for i in chosen]
