"""The data that crosses module boundaries, as msgspec Structs.

Two families live here: the OpenAI Batch file format that the engine reads and writes, and the TCIA records
(decompositions, constraints, ...) that the stages and the task database exchange.
"""

from __future__ import annotations

from typing import Any

import msgspec

# --------------------------------------------------------------------------------------------------------------
# OpenAI Batch format (input and output lines)
# --------------------------------------------------------------------------------------------------------------


class BatchRequest(msgspec.Struct, kw_only=True):
    """One input line: `{"custom_id", "method", "url", "body"}`."""

    custom_id: str
    body: dict[str, Any]
    url: str = "/v1/chat/completions"
    method: str = "POST"


class ResponseOut(msgspec.Struct, kw_only=True):
    status_code: int
    request_id: str = ""
    body: Any = None


class ErrorOut(msgspec.Struct, kw_only=True, omit_defaults=False):
    """A classified failure for one request. `code` is stable and machine-readable (see engine/retry.py)."""

    code: str
    message: str
    status: int | None = None
    attempts: int = 0
    line: int | None = None  # input line number, for bad input lines


class BatchResult(msgspec.Struct, kw_only=True):
    """One output line: `{"id", "custom_id", "response", "error"}`; exactly one of response/error is set."""

    id: str
    custom_id: str
    response: ResponseOut | None = None
    error: ErrorOut | None = None


# --------------------------------------------------------------------------------------------------------------
# TCIA records
# --------------------------------------------------------------------------------------------------------------

CATEGORIES = ("Content", "Numerical", "Style/Tone", "Format", "Language", "Input Placeholder")


class Constraint(msgspec.Struct, kw_only=True, frozen=True):
    category: str
    constraint: str
    simplified_query: str = ""


class Task(msgspec.Struct, kw_only=True):
    task_type: str
    base_query: str
    constraints: list[Constraint] = []


class Decomposition(msgspec.Struct, kw_only=True):
    """The decompose stage's answer for one instruction (README, `run`, step 1)."""

    complex: bool
    language: list[str] = []
    tasks: list[Task] = []


class Seed(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A seed line: a misspelt field ("context") is an error, not a seed silently without its contexts."""

    id: str
    instruction: str
    contexts: list[str] = []


# --------------------------------------------------------------------------------------------------------------
# The TCIA pipeline's records
# --------------------------------------------------------------------------------------------------------------

SEED = "seed"
RETRIEVED = "retrieved"


class SetConstraint(msgspec.Struct, kw_only=True, frozen=True):
    """A constraint in a constraint set: its text, category and where it came from (the seed, or the task DB)."""

    text: str
    category: str
    origin: str = SEED


class SeedTask(msgspec.Struct, kw_only=True):
    """A seed after decomposition: the fixed base query and task type, and its own constraints."""

    seed_id: str
    instruction: str
    task_type: str
    base_query: str
    constraints: list[SetConstraint]
    language: list[str] = []
    contexts: list[str] = []


class ConstraintSet(msgspec.Struct, kw_only=True):
    """One output of the breadth-first search: a set of constraints at `hop` operations from the seed's, reached
    by `ops` (e.g. ["add", "replace"])."""

    seed_id: str
    index: int  # position in the seed's sample: with seed_id, the identity of everything made from it
    hop: int
    ops: list[str]
    constraints: list[SetConstraint]


# What the stages ask the models for (strict JSON schemas are made from these).


class ComposeAnswer(msgspec.Struct, kw_only=True):
    prompt: str


class ConstraintCheck(msgspec.Struct, kw_only=True):
    index: int
    covered: bool
    reason: str


class VerifyAnswer(msgspec.Struct, kw_only=True):
    results: list[ConstraintCheck]


class ValidateAnswer(msgspec.Struct, kw_only=True):
    validity: int
    validity_reason: str
    consistency: int
    consistency_reason: str


class OnTaskAnswer(msgspec.Struct, kw_only=True):
    same_task: bool
    reason: str


class Score(msgspec.Struct, kw_only=True):
    score: int
    reason: str


class JudgeAnswer(msgspec.Struct, kw_only=True):
    general_quality: Score
    helpfulness: Score
    instruction_following: Score
    honesty: Score
    truthfulness: Score


class EvolAnswer(msgspec.Struct, kw_only=True):
    instruction: str


# What the pipeline writes.


class Check(msgspec.Struct, kw_only=True):
    """A score or verdict with the model's reason."""

    score: int | None = None
    ok: bool | None = None
    reason: str = ""


class Instruction(msgspec.Struct, kw_only=True):
    """One composed instruction, kept or dropped (RUNDIR/instructions.jsonl)."""

    id: str
    seed_id: str
    method: str
    hop: int
    ops: list[str]
    constraints: list[SetConstraint]
    prompt: str = ""
    compose_attempts: int = 0
    uncovered: list[int] = []  # indexes of constraints the last verification found missing
    validity: Check | None = None
    consistency: Check | None = None
    on_task: Check | None = None
    kept: bool = False
    dropped: str | None = None  # why, when not kept: not_covered, invalid, inconsistent, off_task


class Response(msgspec.Struct, kw_only=True):
    """One generator's answer to one (instruction, context) pair, with the judge's scores."""

    generator: str
    text: str
    scores: dict[str, int] = {}
    reasons: dict[str, str] = {}
    mean: float | None = None


class Pair(msgspec.Struct, kw_only=True):
    """An instruction with one of its seed's contexts filled in, and the answers to it."""

    id: str  # instruction id + "/" + context index
    instruction: Instruction
    context_index: int | None
    prompt: str  # the instruction with the context in place of its placeholder
    responses: list[Response] = []


class Failure(msgspec.Struct, kw_only=True):
    """An item that failed a stage (RUNDIR/failures.jsonl); the other items went on."""

    stage: str
    id: str
    seed_id: str = ""
    code: str = ""
    reason: str = ""
