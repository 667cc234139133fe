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
    """The decompose stage's answer for one instruction (METHOD.md, stage 1)."""

    complex: bool
    language: list[str] = []
    tasks: list[Task] = []


class Seed(msgspec.Struct, kw_only=True):
    id: str
    instruction: str
    contexts: list[str] = []
