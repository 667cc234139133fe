"""Structured answers: any schema gets a valid instance; our stage schemas get rule-based content."""

from __future__ import annotations

import json
import math
import re

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcia_async.sim import rules

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------------------------------------------
# A tiny JSON-schema validator for the subset the strategies below generate (written independently of the
# simulator's generator, so the two cannot share a mistake).
# ---------------------------------------------------------------------------------------------------------------

def _is(t: str, v) -> bool:
    return {
        "string": isinstance(v, str), "boolean": isinstance(v, bool), "null": v is None,
        "integer": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "object": isinstance(v, dict), "array": isinstance(v, list),
    }[t]


def check(v, s, root) -> list[str]:
    if "$ref" in s:
        name = s["$ref"].split("/")[-1]
        return check(v, root["$defs"][name], root)
    if "const" in s:
        return [] if v == s["const"] else [f"{v!r} != const {s['const']!r}"]
    if "enum" in s:
        return [] if v in s["enum"] else [f"{v!r} not in enum"]
    if "anyOf" in s:
        return [] if any(not check(v, b, root) for b in s["anyOf"]) else [f"{v!r} fits no anyOf branch"]
    t = s.get("type")
    if isinstance(t, list):
        return [] if any(not check(v, {**s, "type": x}, root) for x in t) else [f"{v!r} fits no type of {t}"]
    if t is not None and not _is(t, v):
        return [f"{v!r} is not {t}"]
    errs: list[str] = []
    if t in ("integer", "number"):
        if "minimum" in s and v < s["minimum"]:
            errs.append(f"{v} < minimum")
        if "maximum" in s and v > s["maximum"]:
            errs.append(f"{v} > maximum")
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            errs.append(f"{v} <= exclusiveMinimum")
        if "exclusiveMaximum" in s and v >= s["exclusiveMaximum"]:
            errs.append(f"{v} >= exclusiveMaximum")
        if "multipleOf" in s and not math.isclose(v / s["multipleOf"], round(v / s["multipleOf"]), abs_tol=1e-9):
            errs.append(f"{v} not a multiple of {s['multipleOf']}")
    if t == "string":
        if len(v) < s.get("minLength", 0) or len(v) > s.get("maxLength", 10**9):
            errs.append(f"len({v!r}) out of bounds")
    if t == "array":
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", 10**9):
            errs.append(f"{len(v)} items out of bounds")
        if s.get("uniqueItems") and len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            errs.append("items not unique")
        for x in v:
            errs += check(x, s.get("items", {}), root)
    if t == "object":
        props = s.get("properties", {})
        for k in s.get("required", []):
            if k not in v:
                errs.append(f"missing {k}")
        for k, x in v.items():
            if k in props:
                errs += check(x, props[k], root)
            elif s.get("additionalProperties") is False:
                errs.append(f"extra property {k}")
    return errs


def _numeric(t: str):
    base = st.integers(-50, 50) if t == "integer" else st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 2))

    @st.composite
    def build(draw):
        s: dict = {"type": t}
        lo = draw(st.none() | base)
        hi = draw(st.none() | base)
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        if lo is not None:
            s[draw(st.sampled_from(["minimum", "exclusiveMinimum"]))] = lo
        if hi is not None:
            key = draw(st.sampled_from(["maximum", "exclusiveMaximum"]))
            gap = 2 if t == "integer" else 0.5  # keep the interval non-empty
            if lo is not None and hi - lo < gap:
                hi = lo + gap
            s[key] = hi
        if t == "integer" and lo is None and hi is None and draw(st.booleans()):
            s["multipleOf"] = draw(st.integers(2, 7))
        return s

    return build()


_strings = st.fixed_dictionaries({}, optional={
    "minLength": st.integers(0, 5), "maxLength": st.integers(5, 30),
    "format": st.sampled_from(["date-time", "date", "email", "uri", "uuid"]),
}).map(lambda d: {"type": "string", **d})
_enums = st.lists(st.text(min_size=1, max_size=8) | st.integers(), min_size=1, max_size=5, unique=True).map(
    lambda xs: {"enum": xs})
_leaf = (_strings | _numeric("integer") | _numeric("number") | st.just({"type": "boolean"})
         | st.just({"type": "null"}) | _enums | st.integers().map(lambda x: {"const": x})
         | st.just({"type": ["string", "null"]}) | st.just({"$ref": "#/$defs/Item"}))
_names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)


def _extend(children):
    obj = st.dictionaries(_names, children, max_size=5).flatmap(lambda props: st.fixed_dictionaries({
        "type": st.just("object"),
        "properties": st.just(props),
        "required": st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
        "additionalProperties": st.booleans(),
    }))
    arr = st.tuples(children, st.integers(0, 3), st.integers(0, 3), st.booleans()).map(
        lambda a: {"type": "array", "items": a[0], "minItems": min(a[1], a[2]), "maxItems": max(a[1], a[2]),
                   **({"uniqueItems": True} if a[3] and a[0].get("type") in ("string", "integer") and
                      "maxLength" not in a[0] and "multipleOf" not in a[0] and "maximum" not in a[0] else {})})
    anyof = st.lists(children, min_size=1, max_size=3).map(lambda bs: {"anyOf": bs})
    return obj | arr | anyof


schemas = st.recursive(_leaf, _extend, max_leaves=12).map(
    lambda s: {**s, "$defs": {"Item": {"type": "object", "properties": {"name": {"type": "string"}},
                                       "required": ["name"], "additionalProperties": False}}})


@settings(max_examples=300, deadline=None)
@given(schema=schemas, h=st.integers(0, 2**64 - 1), scores=st.booleans())
def test_generic_instances_are_valid(schema, h, scores):
    value = rules.instance(schema, h, scores=scores)
    assert check(value, schema, schema) == []
    assert rules.instance(schema, h, scores=scores) == value  # deterministic


def test_checker_rejects_invalid_instances():  # the validator above must be able to fail
    s = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}}, "required": ["a"],
         "additionalProperties": False}
    assert check({"a": 4}, s, s) and check({}, s, s) and check({"a": 1, "b": 2}, s, s)
    assert check({"a": 2}, s, s) == []


# ---------------------------------------------------------------------------------------------------------------
# Rule answers through the SDK
# ---------------------------------------------------------------------------------------------------------------

CATEGORY_ENUM = ["Content", "Numerical", "Style/Tone", "Format", "Language", "Input Placeholder",
                 "Content Constraints", "Numerical Constraints", "Style/Tone Constraints", "Format Constraints",
                 "Language Constraints", "Input Placeholder Constraints"]
DECOMPOSE = {
    "type": "object",
    "properties": {
        "complex": {"type": "boolean"},
        "language": {"type": "array", "items": {"type": "string"}},
        "tasks": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "task_type": {"type": "string"},
                "base_query": {"type": "string"},
                "constraints": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"category": {"type": "string", "enum": CATEGORY_ENUM},
                                   "constraint": {"type": "string"}, "simplified_query": {"type": "string"}},
                    "required": ["category", "constraint", "simplified_query"],
                    "additionalProperties": False}},
            },
            "required": ["task_type", "base_query", "constraints"], "additionalProperties": False}},
    },
    "required": ["complex", "language", "tasks"], "additionalProperties": False,
}


async def _structured(sim, name, schema, user):
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        r = await c.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "system", "content": "rules"}, {"role": "user", "content": user}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                    "strict": True}})
    obj = json.loads(r.choices[0].message.content)
    assert check(obj, schema, schema) == []
    return obj


INSTRUCTION = ("Summarize the meeting transcript below. Use bullet points for the main decisions. "
               "Keep it under 200 words. Write in a neutral tone. Answer in French. Mention every participant.")


async def test_decompose_rule(sim):
    obj = await _structured(sim, "tcia_decompose", DECOMPOSE,
                            f"Decompose this.\n<instruction>{INSTRUCTION}</instruction>")
    assert obj["complex"] is True and obj["language"] == ["en"]
    (task,) = obj["tasks"]
    assert task["task_type"] == "Meeting Summarization"  # the specific kind of work wins
    assert task["base_query"] == "Summarize the meeting transcript below."
    cats = [c["category"].removesuffix(" Constraints") for c in task["constraints"]]
    assert cats == ["Format", "Numerical", "Style/Tone", "Language", "Content"]
    assert [c["constraint"] for c in task["constraints"]][0] == "Use bullet points for the main decisions."
    for c in task["constraints"]:
        assert c["simplified_query"] == f"{task['base_query']} {c['constraint']}"


async def test_decompose_rule_simple_instruction_and_no_tags(sim):
    obj = await _structured(sim, "tcia_decompose", DECOMPOSE, "Write a poem about the sea.")
    assert obj["complex"] is False and obj["tasks"] == []


def test_decompose_categories_and_task_types():
    assert rules.category_of("Insert the [CONTEXT] here.") == "Input Placeholder"
    assert rules.category_of("Respond in German.") == "Language"
    assert rules.category_of("Format the answer as a markdown table.") == "Format"
    assert rules.category_of("Use a friendly voice.") == "Style/Tone"
    assert rules.category_of("Give at most three examples.") == "Numerical"
    assert rules.category_of("Mention the budget.") == "Content"
    assert rules.task_type_of("Write a SQL query that lists users") == "SQL Query Generation"
    assert rules.task_type_of("Translate this paragraph") == "Translation"
    assert rules.task_type_of("Draft an email to the team") == "Email Writing"
    assert rules.task_type_of("Solve the equation 2x = 4") == "Mathematical Problem Solving"
    assert rules.task_type_of("Describe the history of Rome") == "Describe History"
    # Some labels carry the " Constraints" suffix (deterministically per text) to exercise normalisation.
    many = rules.decompose("Do it. " + " ".join(f"Mention item {i}." for i in range(40)), seed=0)
    labels = [c["category"] for c in many["tasks"][0]["constraints"]]
    assert any(lb.endswith(" Constraints") for lb in labels) and any(not lb.endswith(" Constraints")
                                                                      for lb in labels)
    assert rules.decompose("Do it. " + " ".join(f"Mention item {i}." for i in range(40)), seed=0) == many


VERIFY = {"type": "object", "properties": {"results": {"type": "array", "items": {
    "type": "object", "properties": {"index": {"type": "integer"}, "covered": {"type": "boolean"},
                                     "reason": {"type": "string"}},
    "required": ["index", "covered", "reason"], "additionalProperties": False}}},
    "required": ["results"], "additionalProperties": False}


async def test_verify_rule_is_containment(sim):
    user = ("<prompt>Summarize the text.\nUse   BULLET\npoints\n[CONTEXT]\n{context}\n[END CONTEXT]</prompt>\n"
            "<constraints>\n1. use bullet points\n2. Write in French.\n3. Use bullet points only.\n</constraints>")
    obj = await _structured(sim, "tcia_verify", VERIFY, user)
    # Containment after case folding and whitespace normalisation, nothing looser.
    assert [(r["index"], r["covered"]) for r in obj["results"]] == [(1, True), (2, False), (3, False)]
    assert all(r["reason"].startswith("[simulated]") for r in obj["results"])


COMPOSE = {"type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"],
           "additionalProperties": False}


async def test_compose_rule(sim):
    obj = await _structured(sim, "tcia_compose", COMPOSE,
                            "<base_query>Summarize the report.</base_query>\n<constraints>\n- Use bullet points.\n"
                            "Keep it short.\n</constraints>")
    assert obj["prompt"] == ("Summarize the report.\nUse bullet points.\nKeep it short.\n"
                             "[CONTEXT]\n{context}\n[END CONTEXT]")


JUDGE = {"type": "object", "properties": {
    "general_quality": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                                                         "reason": {"type": "string"}},
                        "required": ["score", "reason"], "additionalProperties": False},
    "validity_score": {"type": "integer", "minimum": 1, "maximum": 5},
    "on_task": {"type": "boolean"}},
    "required": ["general_quality", "validity_score", "on_task"], "additionalProperties": False}


async def test_score_schemas_get_plausible_scores(sim):
    scores, flags = [], []
    for i in range(20):
        obj = await _structured(sim, "tcia_judge", JUDGE, f"Judge answer {i}.")
        scores += [obj["general_quality"]["score"], obj["validity_score"]]
        flags.append(obj["on_task"])
        assert obj["general_quality"]["reason"].startswith("[simulated]")
    assert sum(s >= 4 for s in scores) >= 0.75 * len(scores)
    assert sum(flags) >= 0.7 * len(flags)


async def test_other_names_get_generic_instances(sim):
    obj = await _structured(sim, "anything", COMPOSE, "hello")
    assert re.match(r"\[simulated\]", obj["prompt"])
