"""Stage 1, decompose: an instruction -> task type, base query and categorised constraints (README, `run`, step 1).

One structured-output call per instruction (schema name `tcia_decompose`, derived from `records.Decomposition`),
then a pure normalisation pass, so that everything downstream (task DB, BFS, compose) sees the same shape
whatever the model wrote:

- category labels are mapped onto `records.CATEGORIES` ("Format Constraints" -> "Format", "Tone" ->
  "Style/Tone", "Length" -> "Numerical", "Placeholder" -> "Input Placeholder", ...); a label we cannot place
  becomes "Content", the taxonomy's catch-all for requirements on what the answer says, so the requirement is
  kept rather than lost;
- texts are stripped; constraints with an empty text are dropped; within one task a constraint whose text
  repeats an earlier one (ignoring case, spacing and final punctuation) is dropped, the first kept;
- a task with an empty base query is dropped; an empty `task_type` becomes "Unspecified Task"; an empty
  `simplified_query` becomes "base query + constraint";
- `language` holds lower-case ISO 639-1 codes, deduplicated in order (common language names are mapped, other
  unrecognisable entries dropped);
- `complex=False` implies `tasks=[]`, and a "complex" answer without any task is made `complex=False`.

The stage does no I/O except the engine call (the prompt file is read once, on first use).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tcia_async.records import CATEGORIES, Constraint, Decomposition, Task
from tcia_async.tcia.common import block, body

__all__ = [
    "SCHEMA_NAME",
    "build_body",
    "decompose",
    "decompose_seed",
    "keep_one_task",
    "normalise",
    "normalise_category",
]

SCHEMA_NAME = "tcia_decompose"
UNSPECIFIED_TASK = "Unspecified Task"


def build_body(instruction: str, *, model: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chat-completions body for decomposing `instruction` (also usable to write Batch API lines; the engine
    adds the `tcia_decompose` schema, as for every stage).

    `params` (temperature, max_tokens, seed, ...) are merged into the body. Raises ValueError on a blank
    instruction.
    """
    text = instruction.strip()
    if not text:
        raise ValueError("cannot decompose an empty instruction")
    out = body("decompose", "Decompose this instruction.\n\n" + block("instruction", text), model=model)
    if params:
        out.update(params)
    return out


async def decompose(
    engine: Any,
    instruction: str,
    *,
    model: str,
    sample: int = 0,
    params: Mapping[str, Any] | None = None,
) -> Decomposition:
    """Decompose one instruction with one (cached) structured-output call, normalised as the module describes.

    Failures propagate from the engine unchanged: `RequestFailed` (including `code="schema_mismatch"` after the
    engine's bounded schema retries) and `RunStopped`.
    """
    body = build_body(instruction, model=model, params=params)
    raw = await engine.chat_json(body, Decomposition, schema_name=SCHEMA_NAME, sample=sample, stage="decompose")
    return normalise(raw)


async def decompose_seed(
    engine: Any,
    instruction: str,
    *,
    model: str,
    sample: int = 0,
    params: Mapping[str, Any] | None = None,
) -> Decomposition:
    """Decompose a seed instruction: like `decompose`, then `keep_one_task`.

    The result has exactly one task when `complex` is true, none when it is false (a seed without explicit
    requirements: the caller decides what to do with it).
    """
    return keep_one_task(await decompose(engine, instruction, model=model, sample=sample, params=params))


def keep_one_task(decomposition: Decomposition) -> Decomposition:
    """Reduce to the single task a seed stands for: the one with the most constraints, the earliest on a tie.

    Why most constraints: a seed describes one job; when a model splits off a secondary request ("... and then
    list three questions"), the task carrying the requirements is the one TCIA explores, since the BFS works on
    the constraint set. The earliest wins ties because models list the main request first.
    """
    if len(decomposition.tasks) <= 1:
        return decomposition
    best = max(enumerate(decomposition.tasks), key=lambda it: (len(it[1].constraints), -it[0]))[1]
    return Decomposition(complex=decomposition.complex, language=list(decomposition.language), tasks=[best])


# ----------------------------------------------------------------------------------------------------------------
# Normalisation (pure)
# ----------------------------------------------------------------------------------------------------------------

_CATEGORY_ALIASES: dict[str, str] = {}


def _alias(category: str, *labels: str) -> None:
    for label in labels:
        _CATEGORY_ALIASES[label] = category


_alias("Content", "content", "semantic", "topic", "scope", "substance", "inclusion", "exclusion", "factual")
_alias(
    "Numerical",
    "numerical", "numeric", "number", "numbers", "quantity", "quantitative", "length", "count", "word count",
    "word limit", "size", "limit", "range",
)
_alias(
    "Style/Tone",
    "style tone", "style", "tone", "style and tone", "tone and style", "tone style", "stylistic", "voice",
    "register", "writing style", "persona",
)
_alias(
    "Format",
    "format", "formatting", "structure", "structural", "layout", "output format", "presentation", "formatting style",
)
_alias("Language", "language", "linguistic", "output language", "lang", "locale", "translation")
_alias(
    "Input Placeholder",
    "input placeholder", "placeholder", "input", "context", "reference", "input reference", "input data",
    "source", "source material", "input context", "context placeholder",
)

# Words that only say "this is a category label" and carry no meaning of their own.
_LABEL_NOISE = {"constraint", "constraints", "requirement", "requirements", "category", "type", "restriction"}


def normalise_category(label: str) -> str:
    """Map a model-written category label onto `records.CATEGORIES`; anything unplaceable becomes "Content"."""
    if label in CATEGORIES:
        return label
    words = [w for w in re.sub(r"[^a-z0-9]+", " ", label.lower()).split() if w not in _LABEL_NOISE]
    key = " ".join(words)
    if key in _CATEGORY_ALIASES:
        return _CATEGORY_ALIASES[key]
    # "Tone of voice", "JSON format", "Response length": the first word we know decides.
    for word in words:
        if word in _CATEGORY_ALIASES:
            return _CATEGORY_ALIASES[word]
    return "Content"


_LANGUAGE_NAMES = {
    "english": "en", "spanish": "es", "espanol": "es", "español": "es", "french": "fr", "francais": "fr",
    "français": "fr", "german": "de", "deutsch": "de", "italian": "it", "portuguese": "pt", "dutch": "nl",
    "japanese": "ja", "chinese": "zh", "mandarin": "zh", "korean": "ko", "arabic": "ar", "russian": "ru",
    "hindi": "hi", "turkish": "tr", "polish": "pl", "swedish": "sv", "greek": "el", "hebrew": "he",
    "vietnamese": "vi", "indonesian": "id", "ukrainian": "uk", "czech": "cs",
}


def _normalise_languages(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        text = value.strip().lower()
        code = _LANGUAGE_NAMES.get(text)
        if code is None:
            # "en", "en-US", "pt_BR" -> the ISO 639-1 part.
            head = re.split(r"[-_]", text, maxsplit=1)[0]
            code = head if len(head) == 2 and head.isalpha() else None
        if code and code not in out:
            out.append(code)
    return out


def _dedup_key(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!;:, ")


def _normalise_task(task: Task) -> Task | None:
    base_query = task.base_query.strip()
    if not base_query:
        return None
    constraints: list[Constraint] = []
    seen: set[str] = set()
    for c in task.constraints:
        text = " ".join(c.constraint.split())
        key = _dedup_key(text)
        if not key or key in seen:
            continue
        seen.add(key)
        simplified = c.simplified_query.strip() or f"{base_query} {text}"
        constraints.append(
            Constraint(category=normalise_category(c.category), constraint=text, simplified_query=simplified)
        )
    return Task(task_type=task.task_type.strip() or UNSPECIFIED_TASK, base_query=base_query, constraints=constraints)


def normalise(decomposition: Decomposition) -> Decomposition:
    """Return a normalised copy of a model's decomposition (rules in the module docstring). Idempotent."""
    languages = _normalise_languages(decomposition.language)
    if not decomposition.complex:
        return Decomposition(complex=False, language=languages, tasks=[])
    tasks = [t for t in (_normalise_task(task) for task in decomposition.tasks) if t is not None]
    return Decomposition(complex=bool(tasks), language=languages, tasks=tasks)
