"""The Evol-Instruct baseline (WizardLM; the method the TCIA paper compares against), as a second method.

Each hop rewrites the previous hop's instructions with one operation drawn at random (seeded): in-depth (add
constraints, deepen, concretize, increase reasoning, complicate the input) or in-breadth (a new instruction in
the same domain). Hop h makes as many instructions as a TCIA run with the same explore settings samples at hop
h (or `per_hop`), each rewriting a parent of hop h-1 in turn, so the two methods can be compared hop by hop with
the same downstream stages. The prompts are ours.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from tcia_async.records import EvolAnswer, Instruction, SeedTask
from tcia_async.tcia.common import CONTEXT_BLOCK, PLACEHOLDER, block, body, placeholder_problem
from tcia_async.tcia.explore import literal_hop_counts, rng_for

OPERATIONS = ("add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input", "breadth")


def hop_sizes(evol: Any, explore: Any) -> list[int]:
    """Instructions per hop: `evol.per_hop` for each of `evol.hops`, or what TCIA's Algorithm 1 samples per hop
    with the same K, m and k (expected values: 21, 638 and 1,340 with the paper's settings)."""
    if evol.per_hop:
        return [evol.per_hop] * evol.hops
    counts = literal_hop_counts(explore.queue_limit, explore.repeats)
    total = sum(counts)
    share = min(1.0, explore.sample / total) if total else 0.0
    sizes = [max(1, round(c * share)) for c in counts[: evol.hops]]
    return sizes + [sizes[-1]] * (evol.hops - len(sizes)) if sizes else [1] * evol.hops


def evol_body(instruction: str, operation: str, *, model: str, temperature: float | None = None,
              variant: int = 0) -> dict[str, Any]:
    parts = ["Rewrite the instruction.", block("instruction", instruction), block("operation", operation)]
    if variant:
        # Several rewrites of one parent by one operation: without this they would be one request, one answer.
        parts.append(block("variant", str(variant)))
    return body("evol", "\n\n".join(parts), model=model, temperature=temperature)


def root(task: SeedTask) -> Instruction:
    """Hop 0: the seed itself, with a context placeholder when it has none."""
    prompt = task.instruction.strip()
    if PLACEHOLDER not in prompt:
        prompt = f"{prompt}\n\n{CONTEXT_BLOCK}"
    return Instruction(id=f"{task.seed_id}/e0-00000", seed_id=task.seed_id, method="evol", hop=0, ops=[],
                       constraints=[], prompt=prompt, compose_attempts=0)


async def evolve(engine: Any, task: SeedTask, per_hop: list[int], *, emit: Callable[[Instruction], Awaitable[None]],
                 model: str, temperature: float | None = None, run_seed: int = 0, priority: int = 0,
                 workers: int = 64, on_failure: Callable[[str, BaseException], None] | None = None) -> None:
    """Rewrite hop after hop, handing each new instruction to `emit` as soon as it is written. A rewrite that
    fails goes to `on_failure(id, error)`; its lineage ends there."""
    from tcia_async.engine import RequestFailed

    parents = [root(task)]
    limiter = anyio.CapacityLimiter(max(1, workers))
    for hop, n in enumerate(per_hop, 1):
        children: dict[int, Instruction] = {}

        plan = []
        seen: dict[tuple[int, str], int] = {}
        for j in range(n):
            op = rng_for(run_seed, "evol", task.seed_id, str(hop), str(j)).choice(OPERATIONS)
            variant = seen.get((j % len(parents), op), 0)
            seen[(j % len(parents), op)] = variant + 1
            plan.append((op, variant))

        async def one(j: int) -> None:
            parent = parents[j % len(parents)]
            op, variant = plan[j]

            def problem(a: EvolAnswer) -> str | None:
                text = a.instruction.strip()
                if text == parent.prompt.strip():
                    return "the rewritten instruction is the same as the given one"
                return placeholder_problem(text)

            async with limiter:
                try:
                    a = await engine.chat_json(evol_body(parent.prompt, op, model=model, temperature=temperature,
                                                         variant=variant),
                                               EvolAnswer, schema_name="tcia_evol", stage="evol", priority=priority,
                                               check=problem)
                except RequestFailed as exc:
                    if on_failure is not None:
                        on_failure(f"{task.seed_id}/e{hop}-{j:05d}", exc)
                    return  # that lineage ends here; the hop goes on with the others
            child = Instruction(id=f"{task.seed_id}/e{hop}-{j:05d}", seed_id=task.seed_id, method="evol", hop=hop,
                                ops=[*parent.ops, op], constraints=[], prompt=a.instruction.strip(),
                                compose_attempts=1)
            children[j] = child
            await emit(child)

        async with anyio.create_task_group() as tg:
            for j in range(n):
                tg.start_soon(one, j)
        if not children:
            return
        parents = [children[j] for j in sorted(children)]
