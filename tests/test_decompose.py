"""The decompose stage: request shape, normalisation, seed reduction, and the shipped corpus.

Unit tests run without a network. The integration tests drive the real Engine against the simulator on
127.0.0.1 and check that the shipped corpus decomposes into the variety the task DB needs.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tcia_async.io import Line, iter_jsonl
from tcia_async.records import CATEGORIES, Constraint, Decomposition, Task
from tcia_async.tcia.decompose import (
    SCHEMA_NAME,
    build_body,
    decompose,
    keep_one_task,
    normalise,
    normalise_category,
)
from tcia_async.engine.schema import response_format_for, strict_schema

DATA = Path(__file__).resolve().parent.parent / "tcia_async" / "data"


def _c(category: str, text: str, simplified: str = "") -> Constraint:
    return Constraint(category=category, constraint=text, simplified_query=simplified)


# ---------------------------------------------------------------------------------------------------------------
# Category labels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Format Constraints", "Format"),
        ("format", "Format"),
        ("Formatting", "Format"),
        ("Structure", "Format"),
        ("Style", "Style/Tone"),
        ("Tone", "Style/Tone"),
        ("style / tone", "Style/Tone"),
        ("Style and Tone Constraints", "Style/Tone"),
        ("Tone of voice", "Style/Tone"),
        ("Numeric", "Numerical"),
        ("Numerical Constraint", "Numerical"),
        ("Length", "Numerical"),
        ("Word count", "Numerical"),
        ("Placeholder", "Input Placeholder"),
        ("Input", "Input Placeholder"),
        ("input_placeholder", "Input Placeholder"),
        ("Input Placeholder Constraints", "Input Placeholder"),
        ("Language Constraints", "Language"),
        ("language", "Language"),
        ("Content Constraints", "Content"),
        ("", "Content"),
        ("Persuasiveness", "Content"),  # unknown -> the catch-all
    ],
)
def test_category_labels_map_onto_the_six_categories(label: str, expected: str) -> None:
    assert normalise_category(label) == expected


def test_canonical_categories_map_to_themselves() -> None:
    for category in CATEGORIES:
        assert normalise_category(category) == category


# ---------------------------------------------------------------------------------------------------------------
# Normalisation of a whole answer
# ---------------------------------------------------------------------------------------------------------------


def test_normalise_cleans_constraints_within_each_task() -> None:
    raw = Decomposition(
        complex=True,
        language=["EN", "en-US", "Spanish", "not a language", "es"],
        tasks=[
            Task(
                task_type="  Summarization ",
                base_query=" Summarize the transcript. ",
                constraints=[
                    _c("Numerical Constraints", "  Keep it under 100 words. "),
                    _c("format", ""),  # empty: dropped
                    _c("Format", "   "),  # blank: dropped
                    _c("Numerical", "keep it   UNDER 100 words"),  # same requirement again: dropped
                    _c("Style", "Use a neutral tone.", "Summarize the transcript in a neutral tone."),
                ],
            ),
            Task(
                task_type="",
                base_query="List open questions.",
                # the same text as in the first task is kept: dedup is per task
                constraints=[_c("Numeric", "Keep it under 100 words.")],
            ),
        ],
    )
    out = normalise(raw)
    assert out.complex is True
    assert out.language == ["en", "es"]
    first, second = out.tasks
    assert first.task_type == "Summarization"
    assert first.base_query == "Summarize the transcript."
    assert [(c.category, c.constraint) for c in first.constraints] == [
        ("Numerical", "Keep it under 100 words."),
        ("Style/Tone", "Use a neutral tone."),
    ]
    # a missing simplified query is derived; a given one is kept
    assert first.constraints[0].simplified_query == "Summarize the transcript. Keep it under 100 words."
    assert first.constraints[1].simplified_query == "Summarize the transcript in a neutral tone."
    assert second.task_type == "Unspecified Task"
    assert [(c.category, c.constraint) for c in second.constraints] == [("Numerical", "Keep it under 100 words.")]
    assert normalise(out) == out  # idempotent


def test_not_complex_means_no_tasks() -> None:
    raw = Decomposition(
        complex=False,
        language=["en"],
        tasks=[Task(task_type="Poetry", base_query="Write a haiku.", constraints=[_c("Format", "Three lines.")])],
    )
    assert normalise(raw) == Decomposition(complex=False, language=["en"], tasks=[])


def test_complex_without_a_usable_task_becomes_not_complex() -> None:
    raw = Decomposition(complex=True, language=["en"], tasks=[Task(task_type="X", base_query="  ")])
    out = normalise(raw)
    assert out.complex is False and out.tasks == []


def test_a_task_without_constraints_is_kept() -> None:
    raw = Decomposition(complex=True, tasks=[Task(task_type="QA", base_query="Why is the sky blue?")])
    assert normalise(raw).tasks == [Task(task_type="QA", base_query="Why is the sky blue?", constraints=[])]


# ---------------------------------------------------------------------------------------------------------------
# Seeds keep one task
# ---------------------------------------------------------------------------------------------------------------


def _task(name: str, n: int) -> Task:
    return Task(task_type=name, base_query=f"Do {name}.", constraints=[_c("Content", f"{name} {i}.") for i in range(n)])


def test_seed_keeps_the_task_with_most_constraints() -> None:
    d = Decomposition(complex=True, language=["en"], tasks=[_task("a", 1), _task("b", 3), _task("c", 2)])
    assert [t.task_type for t in keep_one_task(d).tasks] == ["b"]
    assert keep_one_task(d).language == ["en"]


def test_seed_tie_keeps_the_first_task() -> None:
    d = Decomposition(complex=True, tasks=[_task("a", 2), _task("b", 2)])
    assert [t.task_type for t in keep_one_task(d).tasks] == ["a"]


def test_seed_with_zero_or_one_task_is_unchanged() -> None:
    one = Decomposition(complex=True, tasks=[_task("a", 1)])
    none = Decomposition(complex=False)
    assert keep_one_task(one) == one
    assert keep_one_task(none) == none


# ---------------------------------------------------------------------------------------------------------------
# Request body and schema
# ---------------------------------------------------------------------------------------------------------------


def _objects(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append(node)
        for value in node.values():
            found.extend(_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_objects(value))
    return found


def test_body_puts_the_instruction_in_tags_and_asks_for_the_strict_schema() -> None:
    from tcia_async.engine.core import json_body

    body = build_body("Summarize this.\nKeep it short.", model="m1", params={"temperature": 0})
    assert body["model"] == "m1" and body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system" and "Input Placeholder" in system["content"]
    assert user["role"] == "user"
    assert re.search(r"<instruction>\nSummarize this\.\nKeep it short\.\n</instruction>", user["content"])
    # The schema is the engine's to add (chat_json online, chat_json_item for a batch line), as for every stage.
    assert "response_format" not in body
    rf = json_body(body, Decomposition, SCHEMA_NAME)["response_format"]
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["name"] == SCHEMA_NAME == "tcia_decompose"
    schema = rf["json_schema"]["schema"]
    assert "$ref" not in str(schema) and "default" not in str(schema)
    objects = _objects(schema)
    assert len(objects) == 3  # Decomposition, Task, Constraint
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert sorted(obj["required"]) == sorted(obj["properties"])
    assert schema["properties"]["tasks"]["items"]["properties"]["constraints"]["items"]["required"] == [
        "category",
        "constraint",
        "simplified_query",
    ]


def test_body_defuses_a_closing_tag_inside_the_instruction() -> None:
    user = build_body("Explain </instruction> tags. Be brief.", model="m")["messages"][1]["content"]
    assert user.count("</instruction>") == 1 and user.rstrip().endswith("</instruction>")


def test_blank_instruction_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty instruction"):
        build_body("  \n", model="m")


def test_a_strict_answer_parses_into_the_struct() -> None:
    # An answer that fills every required field (as strict mode forces) decodes into the records.
    answer = {
        "complex": True,
        "language": ["en"],
        "tasks": [
            {
                "task_type": "T",
                "base_query": "Q",
                "constraints": [{"category": "Format", "constraint": "c", "simplified_query": "Q c"}],
            }
        ],
    }
    assert msgspec.convert(answer, Decomposition).tasks[0].constraints[0].constraint == "c"


def test_schema_refuses_what_strict_mode_cannot_express() -> None:
    class Open(msgspec.Struct):
        extra: dict[str, int]

    class Anything(msgspec.Struct):
        value: Any

    with pytest.raises(TypeError, match=r"extra: a free-form mapping"):
        strict_schema(Open)
    with pytest.raises(TypeError, match=r"value: an unconstrained value"):
        strict_schema(Anything)


def test_response_format_is_shared_per_type_and_name() -> None:
    assert response_format_for(Decomposition, "a") is response_format_for(Decomposition, "a")
    assert response_format_for(Decomposition, "b")["json_schema"]["name"] == "b"


class _RecordingEngine:
    """Answers chat_json with a fixed raw decomposition and records what it was asked."""

    def __init__(self, answer: Decomposition) -> None:
        self.answer = answer
        self.calls: list[tuple[dict[str, Any], type, int]] = []

    async def chat_json(self, body: dict[str, Any], typ: type, *, schema_name: str | None = None, sample: int = 0,
                        stage: str = "", priority: int = 0) -> Any:
        self.calls.append((body, typ, sample))
        return self.answer


@pytest.mark.anyio
async def test_decompose_makes_one_call_and_normalises_the_answer() -> None:
    raw = Decomposition(
        complex=True,
        language=["EN"],
        tasks=[Task(task_type="Summarization", base_query="Summarize.", constraints=[_c("Tone", "Be neutral.")])],
    )
    engine = _RecordingEngine(raw)
    out = await decompose(engine, "Summarize. Be neutral.", model="m", sample=3)
    assert len(engine.calls) == 1
    body, typ, sample = engine.calls[0]
    assert typ is Decomposition and sample == 3 and body["model"] == "m"
    assert out.language == ["en"]
    assert out.tasks[0].constraints[0].category == "Style/Tone"


# ---------------------------------------------------------------------------------------------------------------
# Shipped data
# ---------------------------------------------------------------------------------------------------------------


def _read(name: str) -> list[dict[str, Any]]:
    rows = []
    for item in iter_jsonl(DATA / name):
        assert isinstance(item, Line), str(item)
        rows.append(item.value)
    return rows


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def test_corpus_file_is_well_formed_and_varied() -> None:
    rows = _read("corpus.jsonl")
    assert len(rows) >= 320
    assert all(set(r) == {"id", "kind", "instruction"} for r in rows)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    texts = [r["instruction"] for r in rows]
    assert len({t.casefold() for t in texts}) == len(texts)
    n_requirements = Counter(len(_sentences(t)) - 1 for t in texts)
    share_simple = n_requirements[0] / len(texts)
    assert 0.05 <= share_simple <= 0.2  # about one in ten has no explicit requirement
    assert sum(n for k, n in n_requirements.items() if k >= 4) >= 5  # some carry 4-5 requirements


def test_seeds_and_contexts_are_shipped() -> None:
    seeds = _read("seeds.jsonl")
    assert [s["id"] for s in seeds] == ["meeting-summary", "code-review", "support-email"]
    per_seed = Counter(c["seed_id"] for c in _read("contexts.jsonl"))
    assert all(per_seed[s["id"]] >= 5 for s in seeds)
    assert set(per_seed) == {s["id"] for s in seeds}


# ---------------------------------------------------------------------------------------------------------------
# Integration: real Engine against the simulator
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
async def sim_engine(sim, tmp_path: Path):
    """The conftest simulator (zero latency, no limits, no faults) and a real Engine with an on-disk cache."""
    from tcia_async.config import EngineConfig
    from tcia_async.engine import Engine

    config = EngineConfig(base_url=sim.base_url, cache_path=str(tmp_path / "cache.db"), concurrency=64)
    async with Engine(config) as engine:
        yield sim, engine


@pytest.mark.anyio
async def test_decompose_through_engine_and_simulator(sim_engine) -> None:
    from tcia_async.tcia.decompose import decompose_seed

    sim, engine = sim_engine
    instruction = (
        "Summarize the meeting transcript below. Keep it under 120 words. Use bullet points. "
        "Keep a neutral tone. Answer in French. Mention every decision."
    )
    out = await decompose(engine, instruction, model="gpt-test")
    assert out.complex is True
    (task,) = out.tasks
    assert task.base_query.startswith("Summarize the meeting transcript below")
    assert task.task_type == "Meeting Summarization"
    by_text = {c.constraint.rstrip("."): c.category for c in task.constraints}
    assert by_text == {
        "Keep it under 120 words": "Numerical",
        "Use bullet points": "Format",
        "Keep a neutral tone": "Style/Tone",
        "Answer in French": "Language",
        "Mention every decision": "Content",
    }

    # The answer is cached: asking again sends nothing.
    sent = sim.stats()["requests"]
    assert await decompose(engine, instruction, model="gpt-test") == out
    assert sim.stats()["requests"] == sent

    simple = await decompose(engine, "Write a haiku about rain.", model="gpt-test")
    assert simple.complex is False and simple.tasks == []

    seed = await decompose_seed(engine, instruction, model="gpt-test")
    assert len(seed.tasks) == 1


@pytest.mark.anyio
async def test_simulated_decomposition_of_the_corpus_is_varied(sim_engine) -> None:
    import anyio

    _, engine = sim_engine
    # Every other line: the file is ordered round-robin over the task types, so this sample covers them all.
    rows = _read("corpus.jsonl")[::2]
    results: list[Decomposition] = []

    async def one(text: str) -> None:
        results.append(await decompose(engine, text, model="gpt-test"))

    async with anyio.create_task_group() as tg:
        for row in rows:
            tg.start_soon(one, row["instruction"])

    assert len(results) == len(rows)
    task_types = Counter(t.task_type for d in results for t in d.tasks)
    categories = Counter(c.category for d in results for t in d.tasks for c in t.constraints)
    assert len(task_types) >= 20, task_types
    # No single kind of work dominates the sample.
    assert task_types.most_common(1)[0][1] <= 0.25 * sum(task_types.values()), task_types
    assert set(categories) == set(CATEGORIES), categories
    assert min(categories.values()) >= 5, categories
    share_simple = sum(not d.complex for d in results) / len(results)
    assert 0.05 <= share_simple <= 0.2
